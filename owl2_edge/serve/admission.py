"""Admission: how many requests the server lets in ahead of the engine (docs/design.md §13).

The engine answers `parallel` requests at once and queues the rest, first come first served.
Here a request is counted from the moment it is let in (before its images are read) until the
engine admits it, and refused with 429 and a Retry-After when --max-queue requests wait
already while every slot is busy: a client is told at once to come back, rather than held.
Only the event loop's thread runs this (no lock needed).
"""

from __future__ import annotations

import math

from owl2_edge.serve.limits import ApiError
from owl2_edge.serve.metrics import Metrics

# Retry-After's bounds (seconds): at least a second, at most a minute whatever the estimate.
_RETRY_AFTER_MIN, _RETRY_AFTER_MAX = 1, 60


class Admission:
    def __init__(self, owl, max_waiting: int, metrics: Metrics):
        self.owl, self.max_waiting, self.metrics = owl, max_waiting, metrics
        self.preparing = 0  # let in, images being read: not yet the engine's

    @property
    def busy(self) -> int:
        """Requests being answered (each holds a sequence of the cache)."""
        return self.owl.engine.n_running

    @property
    def waiting(self) -> int:
        """Requests let in that no slot has taken yet."""
        return self.preparing + self.owl.engine.n_waiting

    def enter(self) -> None:
        """Let a request in, or refuse it with 429 when the queue is full."""
        if self.busy >= self.owl.parallel and self.waiting >= self.max_waiting:
            self.metrics.queue_rejected += 1
            raise ApiError(429, f"the server is busy: {self.busy} request(s) answered and "
                                f"{self.waiting} waiting, the most it queues (owl2 serve "
                                f"--max-queue)", code="queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        self.preparing += 1

    def submitted(self) -> None:
        """The request's answer is the engine's now (or it was refused before)."""
        self.preparing -= 1

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead, answered `parallel` at a time,
        at the mean answer time so far."""
        per_answer = self.metrics.mean_answer_seconds() or 1.0
        rounds = (self.waiting + 1) / self.owl.parallel
        return max(_RETRY_AFTER_MIN, min(_RETRY_AFTER_MAX, math.ceil(per_answer * rounds)))

    def to_dict(self) -> dict:
        return {"busy": self.busy, "waiting": self.waiting, "max_waiting": self.max_waiting,
                "parallel": self.owl.parallel}
