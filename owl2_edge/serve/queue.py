"""One request at a time on the model: a bounded queue in front of it, and one worker thread
that runs every call on it (docs/design.md §13).

The event loop never runs the model: a request waits for its turn on an asyncio lock (fairly,
first come first served, at most `max_waiting` behind the one being answered, else 429), then
sends each step of its work to the model thread and awaits it, so other requests (/health,
/metrics, the queue's own refusals) are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import anyio

from owl2_edge.serve.limits import ApiError
from owl2_edge.serve.metrics import Metrics


class ModelQueue:
    def __init__(self, max_waiting: int, metrics: Metrics):
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.waiting = 0
        self.busy = False
        self._lock = asyncio.Lock()
        # One thread: Owl2 serves one call at a time anyway (docs/design.md §4.4), and with every
        # call on the same thread a turn that was not closed is taken over, never waited for.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="owl2-model")

    async def turn(self, deadline: float = float("inf")) -> "Turn":
        """Wait for the model (429 at once when max_waiting requests wait already; 503 when it
        is not this request's by `deadline`, a time.monotonic() time)."""
        if (self.busy or self.waiting) and self.waiting >= self.max_waiting:
            self.metrics.queue_rejected += 1
            raise ApiError(429, f"the server is busy: {self.waiting} request(s) wait behind the "
                                f"one being answered, the most it queues (owl2 serve --max-queue)",
                           code="queue_full")
        self.waiting += 1
        start = time.perf_counter()
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())
                                  if deadline != float("inf") else None):
                await self._lock.acquire()
        except TimeoutError:
            self.metrics.timeouts += 1
            raise ApiError(503, f"the server stayed busy past this request's time limit "
                                f"({time.perf_counter() - start:.0f} s waited; owl2 serve "
                                f"--request-timeout)", code="request_timeout") from None
        finally:
            self.waiting -= 1
        self.busy = True
        waited = time.perf_counter() - start
        self.metrics.waited(waited)
        return Turn(self, waited)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Turn:
    """One request's hold on the model: run() its steps on the model thread, release() once."""

    def __init__(self, queue: ModelQueue, waited_seconds: float = 0.0):
        self._queue = queue
        self._held = True
        self.waited_seconds = waited_seconds  # in the queue, before the model was this turn's

    async def run(self, fn: Callable, *args):
        if not self._held:
            raise RuntimeError("this turn was released")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._queue._executor, fn, *args)

    async def release(self, cleanup: Callable | None = None) -> None:
        """Run `cleanup` (closing the answer's generator) on the model thread, wait for any step
        still running there, then hand the model to the next request. Safe to call twice, and
        from a cancelled task (a client gone): the cleanup is shielded from the cancellation."""
        if not self._held:
            return
        try:
            with anyio.CancelScope(shield=True):
                await self.run(cleanup or _nothing)
        finally:
            self._held = False
            self._queue.busy = False
            self._queue._lock.release()


def _nothing() -> None:
    pass
