"""One answer as the engine and its caller share it (docs/design.md §14).

The engine's thread decides the answer's text pieces and puts them here; the caller takes them
from its own thread (Owl2.stream's reader, a server's request) with next(), or without
blocking with poll() after a waker told it that something arrived. cancel() asks the engine to
stop the answer: it does so before its next step, and the sequence is free for the next
request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from owl2_edge.kv_prefix import IMAGE
from owl2_edge.sampling import SamplingParams
from owl2_edge.stats import Stats

# Where an answer is: queued for a sequence, its prompt being evaluated, its tokens being
# decided, over.
WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"

# poll()'s answer when nothing new has arrived yet.
PENDING = object()


class Job:
    """items: the prompt's KV items (kv_prefix: ("t", id), ("i", key)); pixels: each image's,
    in order; params: sampling; window: the positions the answer's sequence may hold (its
    prompt, then its tokens); positions: what the prompt takes of them (an image n_visual);
    started: time.perf_counter() when the caller began (its first_token counts from there);
    trim: the text's end whitespace is dropped (answer_text.py; a raw completion keeps it)."""

    def __init__(self, items: list, pixels: list[np.ndarray], params: SamplingParams,
                 window: int, positions: int, started: float | None = None, trim: bool = True):
        self.items, self.pixels, self.params = items, pixels, params
        self.window, self.positions, self.trim = window, positions, trim
        self.stats = Stats()
        self.state = WAITING
        self.seq: int | None = None             # the cache sequence it holds, once admitted
        self.waiting_for: str | None = None     # why the engine could not admit it yet
        self.submitted_at = time.perf_counter()
        self.started = started if started is not None else self.submitted_at
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.token_times: list[float] = []      # when each generated token was decided
        self.thread = threading.get_ident()     # who submitted it (see Engine.exclusive)
        self.embeds: list = []                  # one future per image (the vision worker's)
        # The compiled grammar the answer must follow (constrain.py; Owl2.submit), or None.
        self.constraint = None
        # (item count, KVState): the longest prefix of items kept on disk (Engine.find_on_disk)
        self.disk_prefix: tuple | None = None
        # A warm (Owl2.warm): its prompt is prefilled and kept, nothing is answered. It waits
        # while any answer runs or waits (low_priority) until an answer needs its cells.
        self.prefill_only = False
        self.low_priority = False
        self._pieces: deque[str] = deque()
        self._lock = threading.Condition()
        self._finished = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._waker: Callable[[], None] | None = None
        self._done_callbacks: list[Callable[["Job"], None]] = []
        self._wake_engine: Callable[[], None] | None = None  # set by Engine.submit

    @property
    def image_keys(self) -> list:
        return [value for kind, value in self.items if kind == IMAGE]

    # -- the caller's side ------------------------------------------------------------------------

    def next(self, timeout: float | None = None) -> str | None:
        """The next text piece, waiting for it; None once the answer is over. Raises the error
        that ended the answer, or TimeoutError when `timeout` seconds pass first."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._pieces or self._finished, timeout):
                raise TimeoutError("no piece of the answer within the time given")
            return self._take()

    def poll(self):
        """next() without waiting: PENDING when nothing new has arrived."""
        with self._lock:
            if not self._pieces and not self._finished:
                return PENDING
            return self._take()

    def poll_ready(self) -> bool:
        """Whether poll() would return something now."""
        with self._lock:
            return bool(self._pieces) or self._finished

    def _take(self) -> str | None:
        if self._pieces:
            return self._pieces.popleft()
        if self._error is not None:
            raise self._error
        return None

    def __iter__(self) -> Iterator[str]:
        while (piece := self.next()) is not None:
            yield piece

    def cancel(self) -> None:
        """Stop the answer (before the engine's next step); what it said so far stays said."""
        self._cancelled = True
        self._time_decode()
        if self._wake_engine is not None and not self._finished:
            self._wake_engine()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._finished

    def set_waker(self, waker: Callable[[], None] | None) -> None:
        """Call waker() (from the engine's thread: keep it short) whenever a piece arrives or
        the answer ends; a server's event loop uses it to know when to poll()."""
        with self._lock:
            self._waker = waker
            due = bool(self._pieces) or self._finished
        if waker is not None and due:
            waker()

    def add_done_callback(self, fn: Callable[["Job"], None]) -> None:
        """fn(job) once the answer is over (at once when it is already)."""
        with self._lock:
            if not self._finished:
                self._done_callbacks.append(fn)
                return
        fn(self)

    def _time_decode(self) -> None:
        """stats.timings["decode"]: from the first token to the answer's end, or to the
        caller's cancel (a client gone, a time limit), whichever comes first."""
        if self.first_token_at is not None:
            self.stats.timings.setdefault("decode", time.perf_counter() - self.first_token_at)

    # -- the engine's side ------------------------------------------------------------------------

    def put(self, piece: str) -> None:
        if piece:
            with self._lock:
                self._pieces.append(piece)
                self._lock.notify_all()
                waker = self._waker
            if waker is not None:
                waker()

    def finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._finished:
                return
            self._time_decode()
            self.state, self._finished, self._error = DONE, True, error
            self._lock.notify_all()
            waker, callbacks = self._waker, self._done_callbacks
            self._done_callbacks = []
        if waker is not None:
            waker()
        for fn in callbacks:
            fn(self)


class Pieces:
    """The text pieces of one answer, read in order (what Owl2.generate and stream return): an
    iterator over `job`, which it hands to `submit` (the engine) at the first piece asked for,
    and cancels when it is closed, or dropped, before the answer's end. `job.stats` is the
    answer's own from the start (its counts fill in as it goes)."""

    def __init__(self, job: Job, submit: Callable[[Job], Job]):
        self.job = job
        self._submit: Callable[[Job], Job] | None = submit

    @property
    def stats(self) -> Stats:
        return self.job.stats

    def __iter__(self) -> "Pieces":
        return self

    def __next__(self) -> str:
        if self._submit is not None:
            submit, self._submit = self._submit, None
            try:
                submit(self.job)
            except BaseException as e:  # refused (the model closed...): every later read says so
                self.job.finish(e)
                raise
        piece = self.job.next()
        if piece is None:
            raise StopIteration
        return piece

    def close(self) -> None:
        self.job.cancel()

    def __del__(self) -> None:
        self.job.cancel()


__all__ = ["Job", "Pieces", "PENDING", "WAITING", "PREFILL", "DECODE", "DONE"]
