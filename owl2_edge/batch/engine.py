"""Many questions answered together: Owl2.batch's front on the engine (docs/design.md §14).

Each item becomes an answer of the engine (owl2_edge/engine/), the one every caller of an Owl2
goes through: its prompt is rendered and its image read and preprocessed on a thread of this
batch, at most 2 x parallel items ahead of their results (the engine's vision worker encodes the
queued ones' images while the decoder steps the running ones); each answer may hold
n_ctx // parallel positions, so `parallel` of them run at once (more when the cache has room to
spare: never more than fit), and one that fills its share stops with finish_reason "context",
exactly as `ask` does at that n_ctx. The answers are the ones Owl2.ask gives (the same template,
sampler, stopping and text assembly: the one answer loop), up to the last bits of float
arithmetic (a longer attention sum, other kernel shapes).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

from owl2_edge import checks
from owl2_edge.errors import Owl2Error
from owl2_edge.prompt import Turn, render
from owl2_edge.sampling import SamplingParams


class Model(Protocol):
    """What a batch needs of a loaded model (Owl2 is one)."""
    decoder: object

    def prepare(self, prompt: str, images: list, window: int | None = None): ...

    def submit(self, prepared, params: SamplingParams, window: int | None = None): ...


@dataclass(frozen=True)
class BatchItem:
    index: int          # the caller's number for it, passed through to its result
    image: object       # a path (str / Path), bytes or a PIL image; None: a question without one
    question: str


@dataclass
class BatchResult:
    index: int
    image: str | None       # str(path) for paths, None otherwise
    question: str
    answer: str | None      # what Owl2.ask returns for the item; None on error
    error: str | None       # one line, when this item failed (bad image, prompt too long...)
    prompt_tokens: int = 0  # spliced prompt positions (an image counts n_visual)
    reused_positions: int = 0  # of those, shared with another answer's prompt (not evaluated)
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop", "length", "context"; "" on error
    timings: dict = field(default_factory=dict)  # seconds: vision, prefill, decode, total

    def to_row(self) -> dict:
        """The JSON line `owl2 batch` writes."""
        row = {"index": self.index, "image": self.image, "question": self.question}
        if self.error is not None:
            row["error"] = self.error
            return row
        row.update(answer=self.answer, prompt_tokens=self.prompt_tokens,
                   reused_positions=self.reused_positions, completion_tokens=self.completion_tokens, finish_reason=self.finish_reason,
                   timings={k: round(v, 4) for k, v in self.timings.items()})
        return row


def as_items(items: Iterable) -> Iterator[BatchItem]:
    """BatchItems, (image, question) pairs or {"image", "question"} dicts -> BatchItems, the
    others numbered by their place in `items`."""
    for k, item in enumerate(items):
        if isinstance(item, BatchItem):
            yield item
        elif isinstance(item, dict):
            yield BatchItem(k, item.get("image"), item.get("question"))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            yield BatchItem(k, item[0], item[1])
        else:
            raise Owl2Error(f"batch item {k} is a {type(item).__name__}: give BatchItem, "
                            "(image, question) or {'image': ..., 'question': ...}")


def image_label(image) -> str | None:
    """The "image" of an item's result and row: str(path) for a path (a clip's too), None
    otherwise."""
    image = getattr(image, "source", image)  # a clips.Clip: its file
    return str(image) if isinstance(image, (str, os.PathLike)) else None


# --- the batch's own thread: items -> prompts ready for the engine --------------------------------

def _prepare(owl: Model, item: BatchItem, window: int):
    """An item -> what Owl2.prepare makes of its templated question and image."""
    checks.text("question", item.question)
    images = [] if item.image is None else [item.image]
    return owl.prepare(render([Turn(item.question)], n_images=len(images)), images, window)


class _Preparer:
    """Prepares the items on a thread, `ahead` at most before their results are taken, and
    puts ("ready", item, prepared), ("failed", result), ("end",) or ("error", exception) on
    `events`."""

    def __init__(self, owl: Model, items: Iterable, window: int, ahead: int,
                 events: queue.Queue):
        self.owl, self.items, self.window, self.events = owl, items, window, events
        self.room = threading.Semaphore(ahead)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="owl2-batch-prepare", daemon=True)
        self.thread.start()

    def done_with_one(self) -> None:
        self.room.release()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()

    def _work(self) -> None:
        try:
            for item in as_items(self.items):
                while not self.room.acquire(timeout=0.1):
                    if self.stopping.is_set():
                        return
                if self.stopping.is_set():
                    return
                try:
                    self.events.put(("ready", item, _prepare(self.owl, item, self.window)))
                except Owl2Error as e:
                    self.events.put(("failed", _failed(item, e)))
            self.events.put(("end",))
        except BaseException as e:  # a bug, or an item of no known form: the caller raises it
            self.events.put(("error", e))


def _failed(item: BatchItem, error: BaseException) -> BatchResult:
    return BatchResult(item.index, image_label(item.image), str(item.question), None,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)


def _result(item: BatchItem, job) -> BatchResult:
    """A finished answer's result (its text is all in the job by now)."""
    try:
        text = "".join(job)
    except Owl2Error as e:  # NaN logits (a damaged weight?), a refused picture: this item fails
        return _failed(item, e)
    stats, now = job.stats, time.perf_counter()
    t = stats.timings
    return BatchResult(
        item.index, image_label(item.image), item.question, text, None,
        prompt_tokens=job.positions, reused_positions=stats.reused_positions,
        completion_tokens=stats.generated_tokens, finish_reason=stats.finish_reason,
        timings={"vision": t.get("vision", 0.0), "prefill": t.get("prefill", 0.0),
                 "decode": t.get("decode", 0.0), "total": now - job.submitted_at})


def answer_all(owl: Model, items: Iterable, parallel: int, params: SamplingParams
               ) -> Iterator[BatchResult]:
    """Every item's result, as each finishes."""
    window = owl.decoder.n_ctx // parallel  # each answer's share of the cache
    events: queue.Queue = queue.Queue()
    preparer = _Preparer(owl, items, window, 2 * parallel, events)
    running: dict = {}  # job -> item
    ended = False
    try:
        while not ended or running:
            kind, *got = events.get()
            if kind == "ready":
                item, prepared = got
                try:
                    job = owl.submit(prepared, params, window=window)
                except Owl2Error as e:  # too long for its share of the cache
                    preparer.done_with_one()
                    yield _failed(item, e)
                    continue
                running[job] = item
                job.add_done_callback(lambda job: events.put(("done", job)))
            elif kind == "done":
                job = got[0]
                preparer.done_with_one()
                yield _result(running.pop(job), job)
            elif kind == "failed":
                preparer.done_with_one()
                yield got[0]
            elif kind == "end":
                ended = True
            else:
                raise got[0]
    finally:  # closed early: the answers still going end before this returns
        ended_jobs = [threading.Event() for _ in running]
        for job, ended in zip(running, ended_jobs):
            job.add_done_callback(lambda job, ended=ended: ended.set())
            job.cancel()
        for ended in ended_jobs:
            ended.wait()
        preparer.close()


__all__ = ["BatchItem", "BatchResult", "answer_all", "as_items", "image_label"]
