"""The vision model, run on a thread of its own beside the decoder (docs/design.md §14).

Every image a caller submits is queued here at once, so its embeddings are being computed while
the decoder steps the answers already running (ONNX Runtime and the decoder both work without
the GIL). Images are encoded up to the vision model's max_batch per run. An image that another
request is waiting for already (same content key) is not queued twice: both wait for the one
future, so a second question about a picture being answered never encodes it again.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """An image's embeddings, and the number of the vision run that computed them (None: they
    came from the vision model's cache)."""
    embeds: np.ndarray
    run: int | None


# The embeddings of a picture the answer does not need (its cells come from the disk cache).
NOT_NEEDED: Future = Future()
NOT_NEEDED.set_result(Encoded(None, None))


def count_runs(encoded) -> int:
    """How many vision runs computed these Encoded (those from the cache took none)."""
    return len({e.run for e in encoded if e.run is not None})


class VisionWorker:
    def __init__(self, vision):
        self.vision = vision
        self._lock = threading.Condition()
        self._queue: list[tuple[str, np.ndarray, Future]] = []   # waiting for a run
        self._in_flight: dict[str, Future] = {}                 # queued or running, by key
        self._closing = False
        self._thread: threading.Thread | None = None
        self._runs = 0

    def encode(self, pixels: list[np.ndarray], keys: list[str]) -> list[tuple[Future, bool]]:
        """One (future of Encoded, whether this call queued it) per image, in order."""
        out = []
        with self._lock:
            if self._closing:
                raise RuntimeError("the vision worker is closed")
            for p, key in zip(pixels, keys):
                future = self._in_flight.get(key)
                if future is not None:
                    out.append((future, False))
                    continue
                future = Future()
                self._in_flight[key] = future
                self._queue.append((key, p, future))
                out.append((future, True))
            if self._thread is None and self._queue:
                self._thread = threading.Thread(target=self._work, name="owl2-vision",
                                                daemon=True)
                self._thread.start()
            self._lock.notify_all()
        return out

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        for _, _, future in self._queue:
            future.cancel()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                group = self._queue[:self.vision.max_batch]
                del self._queue[:len(group)]
            self._run(group)

    def _run(self, group) -> None:
        keys = [key for key, _, _ in group]
        try:
            before = self.vision.n_runs
            embeds = self.vision.encode_images([p for _, p, _ in group], keys=keys)
            ran = self.vision.n_runs > before
        except BaseException as e:  # a refusal (Owl2Error) or a bug: each waiter raises it
            results = [e] * len(group)
        else:
            if ran:
                self._runs += 1
            results = [Encoded(e, self._runs if ran else None) for e in embeds]
        with self._lock:
            for key in keys:
                self._in_flight.pop(key, None)
        for (_, _, future), result in zip(group, results):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


__all__ = ["VisionWorker", "Encoded", "NOT_NEEDED", "count_runs"]
