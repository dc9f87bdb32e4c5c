"""One choice of a request's reply: a Job of the engine read from the event loop (docs/design.md §13).

The engine decides the answer on its own thread beside the other requests' answers (its text,
stop strings included, decided there as for every caller); the job's waker tells the event loop
when a piece has arrived, so no thread is held per request. Here the request's time limit is held
(still queued at the limit: 503; answering: the answer ends where it is, as max_tokens would end
it), a client that left is noticed while the answer waits for its first piece, and closing
cancels the job: its sequence is free at the engine's next step.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import anyio

from owl2_edge.engine import PENDING, Job
from owl2_edge.engine.job import WAITING
from owl2_edge.openai_chat import finish_reason
from owl2_edge.sampling import SamplingParams
from owl2_edge.serve.limits import ApiError
from owl2_edge.serve.metrics import Metrics
from owl2_edge.serve.shapes import timings
from owl2_edge.stats import Stats

if TYPE_CHECKING:
    from owl2_edge.owl2 import Owl2, Prepared

# How often an answer waiting for its first piece checks that its client is still there.
_PRESENCE_CHECK_S = 0.5


class ClientGone(Exception):
    """The client left before the answer's first piece."""


class Reply:
    def __init__(self, owl: Owl2, metrics: Metrics, n_images: int,
                 deadline: float = float("inf"), started: float | None = None):
        self.owl, self.metrics, self.n_images = owl, metrics, n_images
        self.deadline = deadline          # time.monotonic(): the request's time limit
        self.started = started if started is not None else time.perf_counter()
        self.timed_out = False
        self.job: Job | None = None
        self.finish: str | None = None    # set once the answer is over
        self.disconnected = False
        self._arrived = asyncio.Event()
        self._closed = False
        self._logprobs_sent = 0

    @property
    def stats(self) -> Stats:
        return self.job.stats if self.job is not None else Stats()

    def start(self, prepared: Prepared, params: SamplingParams, trim: bool,
              constraint=None) -> None:
        """Queue the answer for the engine (ContextFullError when it cannot fit a slot); trim:
        its end whitespace is dropped (False: a raw completion's is kept); constraint: params'
        grammar, compiled off the event loop (Owl2.constraint)."""
        loop = asyncio.get_running_loop()
        self.job = self.owl.submit(prepared, params, started=self.started, trim=trim,
                                   constraint=constraint)

        def wake() -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(self._arrived.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        self.job.set_waker(wake)

    async def next(self, request=None) -> str | None:
        """The next text to show, or None once the answer is over (then `finish` is set).
        request: while the answer has not begun, ClientGone when it disconnects."""
        while self.finish is None:
            piece = self.job.poll()
            if piece is PENDING:
                await self._wait(request)
            elif piece is None:
                self.finish = finish_reason(self.job.stats)
            else:
                return piece
        return None

    async def _wait(self, request) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            if self.job.state == WAITING:
                self.metrics.timeouts += 1
                raise ApiError(503, f"every slot stayed busy past this request's time limit "
                                    f"({time.perf_counter() - self.started:.0f} s; owl2 serve "
                                    f"--request-timeout)", code="request_timeout")
            # Out of time: what came so far is the answer, cut as max_tokens would cut it.
            self.timed_out, self.finish = True, "length"
            return
        self._arrived.clear()
        if self.job.poll_ready():
            return
        begun = self.job.stats.generated_tokens > 0 or self.job.finished
        wait = left if (request is None or begun) else min(left, _PRESENCE_CHECK_S)
        with anyio.move_on_after(wait):
            await self._arrived.wait()
        if not self._arrived.is_set() and request is not None and not begun:
            if await request.is_disconnected():
                raise ClientGone()

    async def close(self, disconnected: bool = False) -> None:
        """End the answer (cancelling the job frees its slot at the engine's next step) and
        count what it did. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.disconnected = disconnected
        job = self.job
        if job is not None:
            job.cancel()  # (an answer cut short is timed to here)
            self.metrics.add_answer(job, self.n_images)
        if self.timed_out:
            self.metrics.timeouts += 1
        if disconnected:
            self.metrics.disconnects += 1

    def timings(self) -> dict:
        job = self.job
        queued = job.stats.timings.get("queue", 0.0) if job is not None else 0.0
        return {**timings(self.stats, self.stats.timings.get("decode", 0.0)),
                "queue_ms": round(queued * 1e3, 3)}

    def new_logprobs(self) -> tuple[list, bool]:
        """The TokenLogprobs decided since the last call (a streamed chunk's tokens), and
        whether they start at the answer's first token."""
        entries, first = self.stats.logprobs, self._logprobs_sent == 0
        new, self._logprobs_sent = entries[self._logprobs_sent:], len(entries)
        return new, first

    def usage_stats(self) -> Stats:
        return self.stats
