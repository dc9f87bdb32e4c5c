"""One answer on the model, for one request: Owl2.generate's pieces read one at a time on the
model thread (so the event loop can notice a client that left between two), stop strings
applied, the request's time limit held (the answer ends where it is once it passes), and the
answer's generator closed when it ends, stops or is abandoned, which ends the Owl2 turn and frees
the model for the next request at once (docs/design.md §13)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from owl2_edge.openai_chat import finish_reason
from owl2_edge.sampling import SamplingParams
from owl2_edge.serve.metrics import Metrics
from owl2_edge.serve.queue import Turn
from owl2_edge.serve.shapes import timings
from owl2_edge.serve.stop import StopStrings
from owl2_edge.stats import Stats

if TYPE_CHECKING:
    from owl2_edge.owl2 import Owl2, Prepared


class Answer:
    def __init__(self, owl: Owl2, turn: Turn, metrics: Metrics, n_images: int,
                 stop: tuple[str, ...], deadline: float = float("inf")):
        self.owl, self.turn, self.metrics, self.n_images = owl, turn, metrics, n_images
        self.stops = StopStrings(stop)
        self.deadline = deadline          # time.monotonic(): the request's time limit
        self.timed_out = False
        self.stats: Stats | None = None   # set once the model has started this answer
        self.finish: str | None = None    # set once the answer is over
        self.disconnected = False
        self._pieces = None
        self._started_at = 0.0
        self._decode_seconds = 0.0
        self._closed = False

    async def start(self, prepared: Prepared, params: SamplingParams) -> None:
        """Owl2.generate on the model thread, over a prompt that Owl2.prepare made ready on a
        worker thread (the model thread tokenizes nothing)."""
        self._started_at = time.perf_counter()
        self._pieces = await self.turn.run(self.owl.generate, prepared, (), params)

    async def next(self) -> str | None:
        """The next text to show, or None once the answer is over (then `finish` is set)."""
        while self.finish is None:
            if time.monotonic() > self.deadline:
                # Out of time: what came so far is the answer, cut as max_tokens would cut it.
                self.timed_out, self.finish = True, "length"
                return self.stops.flush() or None
            piece = await self.turn.run(next, self._pieces, None)
            if self.stats is None:
                # The answer's generator put its own Stats on the Owl2 as it started.
                self.stats = self.owl.stats
            if piece is None:
                self.finish = finish_reason(self.stats)
                text = self.stops.flush()
            else:
                text = self.stops.push(piece)
                if self.stops.hit:
                    self.finish = "stop"
            if text:
                return text
        return None

    async def close(self, disconnected: bool = False) -> None:
        """End the answer (closing its generator on the model thread ends the Owl2 turn), give
        the model to the next request and count what the answer did. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.disconnected = disconnected
        pieces = self._pieces
        await self.turn.release(pieces.close if pieces is not None else None)
        if self.stats is not None:
            # Owl2 times the decode only when the answer runs to its end; an answer cut short
            # (a stop string, a client gone) is timed here.
            t = self.stats.timings
            self._decode_seconds = t.get("decode") or max(
                0.0, time.perf_counter() - self._started_at - t.get("first_token", 0.0))
            self.metrics.add_answer(self.stats, self.n_images)
        if self.timed_out:
            self.metrics.timeouts += 1
        if disconnected:
            self.metrics.disconnects += 1

    def timings(self) -> dict:
        return {**timings(self.stats or Stats(), self._decode_seconds),
                "queue_ms": round(self.turn.waited_seconds * 1e3, 3)}

    def usage_stats(self) -> Stats:
        return self.stats or Stats()
