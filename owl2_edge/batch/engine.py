"""Many answers at once: the engine under Owl2.batch (docs/design.md §14).

A decode step reads every weight once whatever the number of positions it carries, so answering
N questions together costs little more per step than answering one. The decoder's KV cache
holds up to MAX_SEQUENCES sequences; here each question being answered owns one, and each step
of the loop below is one pass of the decoder that carries

  - the whole prompt of each question admitted this step (its text and image runs), and
  - the last sampled token of every other answer still going,

so new questions join while others are mid-answer and a finished one frees its sequence at once.

Meanwhile a worker thread reads and preprocesses the next images and runs the vision model on
them in batches (ONNX Runtime and the decoder both work without the GIL), so the decoder rarely
waits for embeddings. Each sequence may use n_ctx // parallel positions of the cache, so the
admitted answers can never run out of room together; an answer that fills its share stops with
finish_reason "context", exactly as `ask` does at that n_ctx. Each answer is stepped by the one
answer loop (owl2_edge/answer.py) that Owl2.ask steps, so the answers are the ones Owl2.ask gives
(same template, sampler, stopping and text assembly), up to the last bits of float arithmetic (a
longer attention sum, other kernel shapes).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

import numpy as np

from owl2_edge import checks
from owl2_edge.answer import Answer
from owl2_edge.errors import Owl2Error
from owl2_edge.image import content_hash
from owl2_edge.kv_prefix import IMAGE, prompt_items, runs_of
from owl2_edge.prompt import Turn, render
from owl2_edge.sampling import SamplingParams


class Model(Protocol):
    """What the engine needs of a loaded model (Owl2 is one): its parts, and its tokenize and
    preprocess with the load's picture settings."""
    manifest: object
    tokenizer: object
    decoder: object
    vision: object

    def tokenize(self, prompt: str) -> list[int]: ...

    def preprocess(self, image) -> np.ndarray: ...


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
    """The "image" of an item's result and row: str(path) for a path, None otherwise."""
    return str(image) if isinstance(image, (str, os.PathLike)) else None


# --- preparing: pixels, prompt, embeddings (the worker thread) -------------------------------------

@dataclass
class _Ready:
    """An item whose prompt and embeddings are known, waiting for a sequence."""
    item: BatchItem
    items: list            # the prompt's items (kv_prefix): ("t", id) and ("i", key)
    embeds: list           # one [n_visual, n_embd] array per image
    positions: int
    vision_seconds: float


_DONE = object()  # the worker has put its last item


class _Preparer:
    """Reads, preprocesses and encodes the items on a thread, `group` images per vision run,
    at most `ahead` items ahead of the decoder. Yields _Ready or BatchResult (an item that
    failed here) through get()."""

    def __init__(self, owl: Model, items: Iterator[BatchItem], group: int, ahead: int):
        self.owl, self.items, self.group = owl, items, group
        self.out: queue.Queue = queue.Queue(maxsize=ahead)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._work, name="owl2-batch-vision", daemon=True)
        self.thread.start()

    def get(self, block: bool):
        """The next prepared item, _DONE, or None when none is ready and block is False."""
        try:
            got = self.out.get(block=block)
        except queue.Empty:
            return None
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                self.out.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()

    def _put(self, thing) -> bool:
        while not self.stopping.is_set():
            try:
                self.out.put(thing, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            pending = []  # (item, prompt items, pixels or None, key) waiting for a vision run
            for item in self.items:
                if self.stopping.is_set():
                    return
                try:
                    pending.append(self._prompt(item))
                except Owl2Error as e:
                    if not self._put(_failed(item, e)):
                        return
                    continue
                if sum(p[2] is not None for p in pending) >= self.group:
                    if not self._encode_and_put(pending):
                        return
                    pending = []
            if pending and not self._encode_and_put(pending):
                return
            self._put(_DONE)
        except BaseException as e:  # a bug, not a bad item: the caller raises it
            self._put(e)

    def _prompt(self, item: BatchItem):
        owl = self.owl
        checks.text("question", item.question)
        n_images = 0 if item.image is None else 1
        ids = owl.tokenize(render([Turn(item.question)], n_images=n_images))
        if n_images == 0:
            return item, prompt_items(ids, []), None, None
        pixels = owl.preprocess(item.image)
        key = content_hash(pixels)
        return item, prompt_items(ids, [key]), pixels, key

    def _encode_and_put(self, pending) -> bool:
        with_image = [p for p in pending if p[2] is not None]
        t = time.perf_counter()
        try:
            embeds = self.owl.vision.encode_images([p[2] for p in with_image],
                                                   keys=[p[3] for p in with_image])
        except Owl2Error as e:  # the vision model refused the batch: each item says why
            for item, *_ in pending:
                if not self._put(_failed(item, e)):
                    return False
            return True
        share = (time.perf_counter() - t) / max(1, len(with_image))
        by_key = {p[3]: e for p, e in zip(with_image, embeds)}
        n_visual = self.owl.manifest.n_visual
        for item, items, pixels, key in pending:
            ready = _Ready(item, items, [by_key[key]] if key else [],
                           sum(n_visual if kind == IMAGE else 1 for kind, _ in items),
                           share if key else 0.0)
            if not self._put(ready):
                return False
        return True


def _failed(item: BatchItem, error: BaseException) -> BatchResult:
    return BatchResult(item.index, image_label(item.image), str(item.question), None,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)


# --- answering: one sequence of the cache per answer (the caller's thread) ---------------------

class _Sequence:
    """One question being answered in sequence `seq` of the cache: its prepared prompt, and its
    Answer (the one answer loop) once the prompt's logits are there."""

    def __init__(self, ready: _Ready, seq: int):
        self.ready, self.seq = ready, seq
        self.answer: Answer | None = None
        self.pieces: list[str] = []
        self.started = self.first_token_at = time.perf_counter()
        self.prefill_seconds = 0.0
        self.reused_positions = 0

    def begin(self, owl: Model, params: SamplingParams, window: int, prefill_seconds: float
              ) -> None:
        """The prompt is in the cache (its logits come next): start the answer."""
        self.prefill_seconds = prefill_seconds
        self.first_token_at = time.perf_counter()
        prompt_ids = [value for kind, value in self.ready.items if kind != IMAGE]
        self.answer = Answer(params, owl.tokenizer, prompt_ids, self.ready.positions, window)

    def take(self, logits: np.ndarray) -> bool:
        """The logits of this sequence's last position: the answer's next step. False once the
        answer is finished."""
        self.pieces.append(self.answer.step(logits))
        return self.answer.token is not None

    def result(self) -> BatchResult:
        r, now, stats = self.ready, time.perf_counter(), self.answer.stats
        return BatchResult(
            r.item.index, image_label(r.item.image), r.item.question, "".join(self.pieces).strip(),
            None, prompt_tokens=r.positions, reused_positions=self.reused_positions,
            completion_tokens=stats.generated_tokens, finish_reason=stats.finish_reason,
            timings={"vision": r.vision_seconds, "prefill": self.prefill_seconds,
                     "decode": now - self.first_token_at, "total": now - self.started})


def _shared_items(new: _Sequence, other: _Sequence) -> int:
    """How many items at the start of `new`'s prompt `other`'s has too, when they include an
    image (sharing a few text tokens is not worth a step); never all of them: the last
    position must run again, its logits start the answer."""
    items, theirs = new.ready.items, other.ready.items
    n, limit = 0, min(len(items) - 1, len(theirs))
    while n < limit and items[n] == theirs[n]:
        n += 1
    return n if any(kind == IMAGE for kind, _ in items[:n]) else 0


def _prompt_runs(decoder, new: _Sequence, running, n_visual: int) -> list:
    """The runs `new`'s sequence still needs for its prompt. When a running answer's prompt
    starts with the same image(s) (several questions about one picture), the new sequence takes
    over those cells (copy_sequence: shared, not copied) and only the rest is evaluated."""
    items = new.ready.items
    width = lambda item: n_visual if item[0] == IMAGE else 1  # noqa: E731
    best, best_items = None, 0
    for other in running:
        n = _shared_items(new, other)
        if n > best_items:
            best, best_items = other, n
    if best is None:
        return runs_of(items, new.ready.embeds)
    shared = sum(width(item) for item in items[:best_items])
    decoder.copy_sequence(best.seq, new.seq)
    decoder.rewind(decoder.n_past_of(new.seq) - shared, seq=new.seq)
    new.reused_positions = shared
    images_shared = sum(1 for kind, _ in items[:best_items] if kind == IMAGE)
    return runs_of(items[best_items:], new.ready.embeds, images_shared)


def answer_all(owl: Model, items: Iterable, parallel: int, params: SamplingParams,
               check_turn=lambda: None) -> Iterator[BatchResult]:
    """Every item's result, as each finishes. The caller owns the Owl2's caches meanwhile
    (check_turn raises if it lost them) and has cleared sequence 0's description (KVPrefix)."""
    decoder = owl.decoder
    window = decoder.n_ctx // parallel  # each sequence's share of the cache
    decoder.wait()
    for seq in range(parallel):
        decoder.clear_sequence(seq)
    free = list(range(parallel - 1, -1, -1))
    active: dict[int, _Sequence] = {}
    preparer = _Preparer(owl, as_items(items), group=owl.vision.max_batch, ahead=2 * parallel)
    waiting: list[_Sequence] = []  # admitted, its prompt held back one step (below)
    more = True
    try:
        while more or active or waiting:
            # Admit what is ready into free sequences; wait for one only when nothing else runs.
            admitted, waiting = waiting, []
            while more and free:
                got = preparer.get(block=not active and not admitted)
                if got is None:
                    break
                if got is _DONE:
                    more = False
                elif isinstance(got, BatchResult):
                    yield got
                    check_turn()
                elif got.positions > window:
                    yield _failed(got.item, Owl2Error(
                        f"the prompt needs {got.positions} positions but each of the {parallel} "
                        f"parallel answers may use {window} (n_ctx {decoder.n_ctx} // parallel)"))
                    check_turn()
                else:
                    admitted.append(_Sequence(got, free.pop()))
            if not active and not admitted:
                continue
            # A prompt that starts with the same picture as another admitted now waits one step:
            # then that one's cells exist, and it shares them instead of evaluating them again.
            now: list[_Sequence] = []
            for a in admitted:
                (waiting if any(_shared_items(a, b) for b in now) else now).append(a)
            admitted = now

            # One step: the new prompts (what another answer's prompt does not share with
            # them), and one token of every answer going on.
            step = [(a.seq, _prompt_runs(decoder, a, active.values(), owl.manifest.n_visual))
                    for a in admitted]
            step += [(seq, [[a.answer.token]]) for seq, a in active.items()]
            t = time.perf_counter()
            logits = decoder.eval_sequences(step)
            seconds = time.perf_counter() - t
            for a in admitted:
                a.begin(owl, params, window, seconds)
                active[a.seq] = a
            for (seq, _), row in zip(step, logits):
                a = active[seq]
                try:
                    if a.take(row):
                        continue
                    done = a.result()
                except Owl2Error as e:  # NaN logits (a damaged weight?): this answer fails
                    done = _failed(a.ready.item, e)
                del active[seq]
                decoder.clear_sequence(seq)
                free.append(seq)
                yield done
                check_turn()
    finally:
        preparer.close()
        if not decoder.closed:
            for seq in range(parallel):
                decoder.clear_sequence(seq)


__all__ = ["BatchItem", "BatchResult", "answer_all", "as_items", "image_label"]
