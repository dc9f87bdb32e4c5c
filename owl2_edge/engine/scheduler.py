"""The engine: every answer of an Owl2 goes through it, whichever thread asks (docs/design.md §14).

A decode step reads every weight once whatever the number of positions it carries, so N answers
stepped together cost little more per step than one. The decoder's KV cache holds up to
MAX_SEQUENCES sequences; each answer being decided owns one. One thread runs this loop:

  1. admit waiting answers, first come first served, while the cache has room: each answer
     reserves its window (the positions it may hold), and the windows of the answers running
     plus the cells kept by idle sequences never exceed n_ctx. A new answer starts from the
     sequence whose cached items share the longest start with its prompt: an idle one is taken
     over in place (the next chat turn), a running one is shared (copy_sequence: its cells, not
     a copy) — so a question about a picture that another answer has prefilled evaluates only
     its own words. A prompt whose picture (or SHARE_WAIT_MIN text positions) another answer is
     about to prefill waits a step for those cells rather than computing them twice. A warm
     (Owl2.warm: a prompt's beginning read ahead, nothing answered) is placed only when no
     answer waits or runs;
  2. plan one decoder pass: the last token of every answer decoding, and the next chunk of each
     prompt still being prefilled (at most prefill_chunk positions in all while others decode,
     so their tokens keep flowing; the whole prompt when nothing else runs; a warm's, a
     chunk at a time and only in a step no answer uses). A chunk stops
     before an image whose embeddings are not ready: the vision worker computes them meanwhile,
     and the text before it is evaluated already;
  3. evaluate it (Decoder.eval_sequences) and step each answer's Answer (the one answer loop,
     owl2_edge/answer.py) with its row of logits; hand the text to its Job.

An answer that ends or is cancelled leaves its sequence idle with its cells kept (for the next
request that shares its start) until the room is needed. Callers never touch the decoder while
answers run; Engine.exclusive() waits until none does and lends it whole (Owl2.logits).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from owl2_edge.answer import Answer
from owl2_edge.errors import BusyError, Owl2Error
from owl2_edge.engine.disk_prefixes import DiskPrefixes
from owl2_edge.engine.job import DECODE, PREFILL, Job
from owl2_edge.engine.vision_worker import NOT_NEEDED, VisionWorker, count_runs
from owl2_edge.kv_prefix import (IMAGE, TEXT, check_fits, common_prefix, positions, runs_of,
                                 width)

# Prompt positions evaluated per step while other answers decode: each step then takes about as
# long as prefilling this many positions, which bounds the pause a new prompt puts in their
# streams (docs/measurements.md); a prompt alone is evaluated whole.
PREFILL_CHUNK = 256

# A prompt waits for another's prefill to share its cells when they hold a picture or at least
# this many text positions (n choices of one request, a long common system prompt): one step's
# wait costs less than evaluating them twice.
SHARE_WAIT_MIN = 32

_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    # The loop must not be inside the decoder while the interpreter and ggml are torn down.
    for engine in list(_engines):
        engine.close()


@dataclass
class _Sequence:
    """A sequence of the cache and what it holds: `cached`, its KV items in position order;
    `job` and `answer` while an answer uses it, None while it is idle (its cells kept)."""
    seq: int
    cached: list
    job: Job | None = None
    answer: Answer | None = None
    last_used: float = 0.0
    # Cells read from the disk cache, restored at the next step (outside the engine's lock: the
    # decoder may still be loading); `cached` describes them already.
    pending_state: object = None


@dataclass
class _Source:
    """What a new answer starts from (Engine._source): `shared` items of `seq`'s cells, or of
    the disk's prefix (from_disk), or nothing; or it waits (`wait_for` says for what)."""
    seq: _Sequence | None = None
    shared: int = 0
    from_disk: bool = False
    wait_for: str | None = None

    @property
    def in_place(self) -> bool:
        """An idle sequence taken over as it is (the next turn of its conversation)."""
        return self.seq is not None and self.seq.job is None


class Engine:
    def __init__(self, decoder, tokenizer, vision, n_visual: int, max_sequences: int,
                 prefill_chunk: int = PREFILL_CHUNK, disk: DiskPrefixes | None = None):
        self.decoder, self.tokenizer, self.n_visual = decoder, tokenizer, n_visual
        self.disk = disk  # prefixes kept on disk for later processes (None: none)
        self.n_ctx = decoder.n_ctx  # read once: a fact, and reading it takes the decoder's lock
        self.max_sequences, self.prefill_chunk = max_sequences, prefill_chunk
        self.vision = VisionWorker(vision)
        self.steps = 0                           # decoder passes so far
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._seqs: dict[int, _Sequence] = {}    # every sequence holding cells
        self._running: list[_Sequence] = []      # those with an answer, in admission order
        self._exclusive_wanted = 0
        self._exclusive_held = False
        self._closing = False
        self._thread: threading.Thread | None = None
        _engines.add(self)

    # -- the callers' side ------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue an answer; its images start encoding now. ContextFullError when its prompt
        cannot fit its window."""
        check_fits(job.items, self.n_visual, job.window, self.n_ctx)
        with self._cond:
            if self._closing:
                raise Owl2Error("the model is closed")
        if job.pixels and not job.low_priority:  # a warm's wait for its admission (_attach)
            self._encode(job)
        job._wake_engine = self._wake
        with self._cond:
            if self._closing:
                raise Owl2Error("the model is closed")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="owl2-engine",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def _encode(self, job: Job) -> None:
        """Send the job's pictures to the vision worker (the pictures inside a prefix read from
        the disk are never needed: not encoded)."""
        covered = _images_in(job.items[:job.disk_prefix[0]]) if job.disk_prefix else 0
        job.embeds = [(NOT_NEEDED, False)] * covered + self.vision.encode(
            job.pixels[covered:], job.image_keys[covered:])
        for future, _ in job.embeds[covered:]:
            future.add_done_callback(lambda f, job=job: self._vision_done(job))

    def find_on_disk(self, items: list):
        """The longest prefix of `items` that the disk keeps and no sequence holds as far:
        (item count, state) for a Job's disk_prefix, or None. Reads the disk on the calling
        thread (Owl2.prepare's), never the engine's."""
        if self.disk is None or not _images_in(items):
            return None
        with self._cond:
            in_memory = max((common_prefix(items, s.cached) for s in self._seqs.values()), default=0)
        return self.disk.find(items, longer_than=in_memory)

    @property
    def n_waiting(self) -> int:
        """Answers queued for room in the cache."""
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        """Answers holding a sequence (prefilling or decoding)."""
        return len(self._running)

    def slots(self) -> list[dict]:
        """Every sequence holding cells: its id, what it does, its positions."""
        with self._cond:
            return [{"seq": s.seq, "state": s.job.state if s.job else "idle",
                     "positions": self._positions(s.cached),
                     "window": s.job.window if s.job else None,
                     "generated": s.job.stats.generated_tokens if s.job else None}
                    for s in sorted(self._seqs.values(), key=lambda s: s.seq)]

    def queued(self) -> list[dict]:
        """Every answer waiting for a sequence, first come first: its prompt's positions, its
        window, and what it waits for (None until the engine has tried to place it)."""
        with self._cond:
            return [{"positions": j.positions, "window": j.window, "waiting_for": j.waiting_for}
                    for j in self._waiting]

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The decoder for the calling thread alone, with an empty cache: waits for the answers
        running to end (new ones wait meanwhile). BusyError when the caller has an answer of its
        own not yet read to its end (it would wait for itself)."""
        me = threading.get_ident()
        with self._cond:
            jobs = [*self._waiting, *(s.job for s in self._running)]
            if any(j.thread == me and not j.cancelled for j in jobs):
                raise BusyError("an answer this thread started is still being read: read it to "
                                "its end or close it before this call")
            self._exclusive_wanted += 1
            try:
                self._cond.wait_for(lambda: self._closing or (not self._exclusive_held
                                                              and not self._running))
            finally:
                self._exclusive_wanted -= 1
            if self._closing:
                raise Owl2Error("the model is closed")
            self._exclusive_held = True
            for s in list(self._seqs.values()):
                self._forget(s)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive_held = False
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the loop (after its step), ending every answer with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        closed = Owl2Error("the model was closed before this answer ended")
        with self._cond:
            jobs = [*self._waiting, *(s.job for s in self._running)]
            self._waiting.clear()
            self._running.clear()
            self._seqs.clear()
        for job in jobs:
            job.finish(closed)
        self.vision.close()

    # -- the loop ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _vision_done(self, job: Job) -> None:
        job.stats.timings["vision"] = time.perf_counter() - job.submitted_at
        self._wake()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    self._drop_cancelled()
                    if not self._exclusive_held:
                        self._admit()
                        decode, prefill = self._plan()
                        if decode or prefill:
                            break
                    self._cond.wait()
            try:
                self._step(decode, prefill)
            except BaseException as e:  # a bug: fail the answers of this step, keep serving
                self._fail([s for s in decode] + [s for s, _, _ in prefill], e)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            job.finish()
        for s in [s for s in self._running if s.job.cancelled]:
            job = s.job
            self._release(s)
            job.finish()

    # -- admission --------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self._waiting and not self._exclusive_wanted:
            job = self._next_waiting()
            if job is None or not self._place(job):
                return
            self._waiting.remove(job)
            for warm in [w for w in self._waiting if w.prefill_only]:
                if common_prefix(warm.items, job.items) == len(warm.items):
                    self._waiting.remove(warm)  # this answer prefills its cells: done by it
                    warm.finish()

    def _next_waiting(self) -> Job | None:
        """The answer to place next: the first waiting answer; a warm only when no answer waits
        or runs (warms are work done ahead, in time nobody else uses)."""
        answers = [j for j in self._waiting if not j.low_priority]
        if answers:
            return answers[0]
        if any(not s.job.low_priority for s in self._running):
            return None
        return self._waiting[0]

    def _place(self, job: Job) -> bool:
        """Give `job` a sequence, in three steps: choose what it starts from, make room, attach.
        False leaves it waiting; job.waiting_for then says why (shown in /props)."""
        source = self._source(job)
        if source.wait_for is None:
            source.wait_for = self._make_room(job, source)
        job.waiting_for = source.wait_for
        if job.waiting_for is not None:
            return False
        self._attach(job, source)
        return True

    def _source(self, job: Job) -> "_Source":
        """What the job's prompt starts from: the sequence sharing the longest start with it
        (an idle one is taken over in place, a running one is shared), or the disk's prefix when
        it reaches further, or nothing. Waits instead when another answer is about to prefill
        cells it would share (a picture, or SHARE_WAIT_MIN text positions)."""
        items = job.items
        on_disk = job.disk_prefix[0] if job.disk_prefix else 0
        best, shared = None, 0
        for s in self._seqs.values():
            n = common_prefix(items, s.cached) if s.pending_state is None else 0
            if s.job is not None and s.job.state == PREFILL:
                planned, have = common_prefix(items, s.job.items), max(n, on_disk)
                if planned > have and (_images_in(items[have:planned])
                                       or planned - have >= SHARE_WAIT_MIN):
                    # A warm whose cells an answer waits for is that answer's work now.
                    s.job.low_priority = False
                    return _Source(wait_for=f"sequence {s.seq} is prefilling cells this prompt "
                                            f"shares ({planned - have} items)")
            if n > shared or (n == shared and n and s.job is None and best.job is not None):
                best, shared = s, n
        if on_disk > shared:
            return _Source(shared=on_disk, from_disk=True)
        return _Source(best, shared)

    def _make_room(self, job: Job, source: "_Source") -> str | None:
        """Evict idle sequences, least recently used first, until the job's window fits beside
        what the others reserve and a sequence is free. None when it fits, else why not."""
        in_place = source.in_place
        others = sum(self._reserved(s) for s in self._seqs.values()
                     if not (in_place and s is source.seq))
        idle = sorted((s for s in self._seqs.values() if s.job is None and s is not source.seq),
                      key=lambda s: s.last_used)

        def fits() -> bool:
            return (others + job.window <= self.n_ctx
                    and (in_place or len(self._seqs) < self.max_sequences))

        while not fits() and idle:
            victim = idle.pop(0)
            others -= self._reserved(victim)
            self._forget(victim)
        if fits():
            return None
        if others + job.window > self.n_ctx:
            return (f"room: running answers reserve {others} of n_ctx {self.n_ctx} positions, "
                    f"this one needs {job.window}")
        return f"a sequence: all {self.max_sequences} are in use"

    def _attach(self, job: Job, source: "_Source") -> None:
        """Start the job in its sequence: the source's cells kept (rewound to what it shares,
        copied from a running one, or read from the disk at the next step), the rest to
        prefill."""
        items, decoder, shared = job.items, self.decoder, source.shared
        keep = self._positions(items[:shared])
        if source.in_place:
            s = source.seq
            decoder.rewind(decoder.n_past_of(s.seq) - keep, seq=s.seq)
        else:
            # A sequence no one holds is empty (_forget cleared it): no decoder call here, which
            # would wait for a decoder still loading (wait=False) while holding the engine.
            s = _Sequence(min(set(range(self.max_sequences)) - set(self._seqs)), [])
            if source.seq is not None:
                decoder.copy_sequence(source.seq.seq, s.seq)
                decoder.rewind(decoder.n_past_of(s.seq) - keep, seq=s.seq)
            elif source.from_disk:
                state = job.disk_prefix[1]
                if state.n_past == keep:
                    s.pending_state, job.stats.disk_positions = state, keep
                else:  # not this prompt's cells after all: evaluate it whole
                    shared = keep = 0
            self._seqs[s.seq] = s
        if job.pixels and not job.embeds:
            # A warm's pictures are encoded once it is admitted, when no answer runs: the
            # vision model would take the cores from their tokens.
            self._encode(job)
        job.disk_prefix = None  # its state's memory is not needed any more
        s.cached, s.job = list(items[:shared]), job
        self._running.append(s)
        job.seq, job.state, job.admitted_at = s.seq, PREFILL, time.perf_counter()
        stats = job.stats
        stats.prompt_positions = job.positions
        stats.reused_positions = keep
        stats.evaluated_positions = job.positions - keep
        stats.timings["queue"] = job.admitted_at - job.submitted_at
        stats.timings["load_wait"] = 0.0

    def _reserved(self, s: _Sequence) -> int:
        return s.job.window if s.job is not None else self._positions(s.cached)

    def _positions(self, items) -> int:
        return positions(items, self.n_visual)

    def _forget(self, s: _Sequence) -> None:
        self.decoder.clear_sequence(s.seq)
        del self._seqs[s.seq]

    def _release(self, s: _Sequence) -> None:
        """The answer in `s` is over: the sequence goes idle, its cells kept."""
        self._running.remove(s)
        s.job, s.answer, s.last_used = None, None, time.perf_counter()
        if s.pending_state is not None:  # ended before its disk cells were restored: it holds none
            s.pending_state = None
            del self._seqs[s.seq]
        self._cond.notify_all()

    # -- stepping ---------------------------------------------------------------------------------

    def _plan(self):
        """This step's work: the sequences decoding, and (sequence, items, runs) of the
        prompts being prefilled."""
        decode = [s for s in self._running if s.job.state == DECODE]
        budget = self.prefill_chunk if decode else None
        # A warm yields to every answer: it is prefilled only in steps no answer takes, a chunk
        # at a time, so that an answer arriving meanwhile waits one chunk at most.
        answering = bool(decode) or any(s.job.state == PREFILL and not s.job.low_priority
                                        for s in self._running)
        prefill = []
        for s in [s for s in self._running if s.job.state == PREFILL]:
            if budget is not None and budget <= 0:
                break
            if s.job.low_priority and (answering or prefill):
                continue
            chunk = self._chunk(s, self.prefill_chunk if s.job.low_priority else budget)
            if chunk is None:
                continue
            prefill.append(chunk)
            if budget is not None:
                budget -= self._positions(chunk[1])
        return decode, prefill

    def _chunk(self, s: _Sequence, budget: int | None):
        """The next items of s's prompt that can be evaluated now, as runs; None when its next
        item is an image still being encoded (or whose encoding failed: the answer ends)."""
        job, start = s.job, len(s.cached)
        first_image = sum(1 for kind, _ in job.items[:start] if kind == IMAGE)
        end, image, used, embeds = start, first_image, 0, {}
        while end < len(job.items):
            kind, _ = job.items[end]
            item_width = width(job.items[end], self.n_visual)
            if end > start and budget is not None and used + item_width > budget:
                break
            if kind == IMAGE:
                future, _ = job.embeds[image]
                if not future.done():
                    break
                if future.exception() is not None:
                    self._release(s)
                    job.finish(future.exception())
                    return None
                embeds[image] = future.result().embeds
                image += 1
            used += item_width
            end += 1
        if end == start:
            return None
        taken = job.items[start:end]
        return s, taken, runs_of(taken, embeds, first_image)

    def _step(self, decode: list[_Sequence], prefill: list) -> None:
        try:
            if not self.decoder.ready:  # loaded with wait=False: the first step waits for it
                t = time.perf_counter()
                self.decoder.wait()
                for s in [*decode, *(s for s, _, _ in prefill)]:
                    s.job.stats.timings["load_wait"] = time.perf_counter() - t
        except Owl2Error as e:
            self._fail([*decode, *(s for s, _, _ in prefill)], e)
            return
        t = time.perf_counter()  # the pass's own time, from here (prefill's, not the wait)
        prefill = self._restore_pending(prefill)
        batch = [(s.seq, runs) for s, _, runs in prefill]
        batch += [(s.seq, [[s.answer.token]]) for s in decode]
        if not batch:
            return
        try:
            logits = self.decoder.eval_sequences(batch)
        except Owl2Error as e:  # the step failed whole (a damaged file?): its answers end
            self._fail([*decode, *(s for s, _, _ in prefill)], e)
            return
        now = time.perf_counter()
        self.steps += 1
        with self._cond:
            for (s, taken, _), row in zip(prefill, logits):
                s.cached.extend(taken)
                job = s.job
                job.stats.timings["prefill"] = job.stats.timings.get("prefill", 0.0) + now - t
                if len(s.cached) == len(job.items) and job.prefill_only:
                    self._end_warm(s)
                elif len(s.cached) == len(job.items):
                    self._begin(s, now)
                    self._advance(s, row, now)
            for s, row in zip(decode, logits[len(prefill):]):
                s.cached.append((TEXT, s.answer.token))
                self._advance(s, row, now)

    def _restore_pending(self, prefill: list) -> list:
        """Restore the cells read from the disk into the sequences this step starts; an answer
        whose cells cannot be restored ends with the error (the others go on)."""
        kept = []
        for entry in prefill:
            s = entry[0]
            if s.pending_state is not None:
                state, s.pending_state = s.pending_state, None
                try:
                    self.decoder.restore_state(state, s.seq)
                except Owl2Error as e:
                    self._fail([s], e)
                    continue
            kept.append(entry)
        return kept

    def _begin(self, s: _Sequence, now: float) -> None:
        job = s.job
        job.state, job.first_token_at = DECODE, now
        job.stats.timings["first_token"] = now - job.started
        # Only futures already done are read: an image whose cells were shared from another
        # sequence may still be encoding for this job, and waiting here, holding the engine's
        # lock, would block the vision thread's callback that needs it (a deadlock).
        job.stats.images_encoded = count_runs(f.result() for f, mine in job.embeds
                                              if mine and f.done() and f.exception() is None)
        if self.disk is not None:
            self._keep_on_disk(s)
        prompt_ids = [value for kind, value in job.items if kind != IMAGE]
        s.answer = Answer(job.params, self.tokenizer, prompt_ids, job.positions, job.window,
                          job.stats, job.constraint, job.trim)

    def _end_warm(self, s: _Sequence) -> None:
        """A warm's prompt is in its sequence: kept there (idle, for the answer that shares
        it) and on the disk, and the warm is over."""
        job = s.job
        job.stats.images_encoded = count_runs(f.result() for f, mine in job.embeds
                                              if mine and f.done() and f.exception() is None)
        if self.disk is not None:
            self._keep_on_disk(s, whole=True)
        self._release(s)
        job.finish()

    def _keep_on_disk(self, s: _Sequence, whole: bool = False) -> None:
        """Hand the disk the prompt's prefixes it does not keep yet (right after each picture,
        before each earlier answer's end; with `whole`, a warm's whole prompt), now that the
        sequence holds them all."""
        for n in self.disk.missing(s.cached, whole=whole):
            if self.disk.busy:  # the disk is behind: keep the memory, not the entry
                return
            try:
                state = self.decoder.save_state(s.seq, self._positions(s.cached[:n]))
            except Owl2Error:
                return
            self.disk.put_state(s.cached[:n], state)

    def _advance(self, s: _Sequence, logits, now: float) -> None:
        job, answer = s.job, s.answer
        try:
            piece = answer.step(logits)
        except Owl2Error as e:  # NaN logits: this answer fails, its cells are suspect
            self._running.remove(s)
            self._forget(s)
            self._cond.notify_all()
            job.finish(e)
            return
        if answer.stats.generated_tokens > len(job.token_times):
            job.token_times.append(now)
        job.put(piece)
        if answer.token is None:
            self._release(s)
            job.finish()

    def _fail(self, seqs: list[_Sequence], error: BaseException) -> None:
        with self._cond:
            for s in seqs:
                job = s.job
                if s in self._running:
                    self._running.remove(s)
                if s.seq in self._seqs:
                    del self._seqs[s.seq]
                    try:
                        self.decoder.clear_sequence(s.seq)
                    except Owl2Error:
                        pass
                if job is not None:
                    job.finish(error)
            self._cond.notify_all()


def _images_in(items) -> int:
    return sum(1 for kind, _ in items if kind == IMAGE)


__all__ = ["Engine", "PREFILL_CHUNK"]
