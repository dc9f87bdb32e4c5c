"""The engine's scheduler (owl2_edge/engine/scheduler.py) driven directly over the tiny model's
real decoder, each decision checked where it is made: which sequence a prompt starts from,
what is evicted, how much prefill rides with running streams, a disk restore, a cancel in the
middle of a prefill, a prompt that cannot fit, and the reason an answer waits. Every answer is
also checked against the same question asked alone: scheduling never changes an answer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from owl2_edge.errors import ContextFullError
from owl2_edge.owl2 import Owl2
from owl2_edge.prompt import Turn, render
from owl2_edge.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)
WINDOW = 128


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def prompt(question: str, n_images: int = 1) -> str:
    return render([Turn(question)], n_images=n_images)


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    """answer(image seed, question) -> the greedy answer of that question asked alone."""
    cache: dict = {}
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=WINDOW) as owl:
        def answer(seed, question, params=GREEDY):
            key = (seed, question, params)
            if key not in cache:
                images = [] if seed is None else [picture(seed)]
                cache[key] = "".join(owl.generate(prompt(question, len(images)), images, params))
            return cache[key]
        yield answer


def load(folder, parallel: int, **options) -> Owl2:
    return Owl2.load(folder, device="cpu", kv_type="f32", n_ctx=WINDOW * parallel,
                     parallel=parallel, **options)


def ask(owl, seed, question, params=GREEDY):
    """Submit and read to the end: (text, job)."""
    images = [] if seed is None else [picture(seed)]
    job = owl.submit(owl.prepare(prompt(question, len(images)), images), params)
    return "".join(job), job


def cached_pictures(owl) -> dict[int, set]:
    """Each sequence holding cells -> the picture keys among its items."""
    return {s.seq: {v for kind, v in s.cached if kind == "i"} for s in owl.engine._seqs.values()}


def key_of(owl, seed) -> str:
    """The content key a picture's cells are known by."""
    return next(v for kind, v in owl.prepare(prompt("?"), [picture(seed)]).items if kind == "i")


def test_a_second_question_on_a_picture_shares_its_cells(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=2) as owl:
        n_visual = owl.manifest.n_visual
        first = owl.submit(owl.prepare(prompt("What is it?"), [picture(1)]), GREEDY)
        second = owl.submit(owl.prepare(prompt("Which colour?"), [picture(1)]), GREEDY)
        texts = ["".join(first), "".join(second)]
        assert texts == [alone(1, "What is it?"), alone(1, "Which colour?")]
        # The second waited a step for the first's prefill, then took its picture's cells.
        assert first.stats.reused_positions == 0
        assert second.stats.reused_positions >= n_visual
        assert second.stats.evaluated_positions == second.positions - second.stats.reused_positions


def test_idle_sequences_are_evicted_least_recently_used_first(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=4) as owl:
        # Three pictures answered together: three sequences, idle afterwards with their cells.
        jobs = [owl.submit(owl.prepare(prompt("What is it?"), [picture(k)]), GREEDY)
                for k in (1, 2, 3)]
        assert ["".join(j) for j in jobs] == [alone(k, "What is it?") for k in (1, 2, 3)]
        seq_of = {k: j.seq for k, j in zip((1, 2, 3), jobs)}
        ask(owl, 2, "How many?")            # picture 2's sequence is used again (in place)
        # A long answer about picture 1 runs in its sequence, reserving a whole window.
        long = owl.submit(owl.prepare(prompt("Talk.", 1), [picture(1)]),
                          SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        next(iter(long))
        held = {slot["seq"]: slot["positions"] for slot in owl.engine.slots()}
        # A question on picture 1 shares the running sequence's cells (a copy) and needs a
        # window that fits only once one idle sequence goes: the least recently used, picture 3's.
        window = owl.engine.n_ctx - WINDOW - held[seq_of[2]]
        job = owl.submit(owl.prepare(prompt("Which colour?"), [picture(1)]), GREEDY,
                         window=window)
        assert "".join(job) == alone(1, "Which colour?")
        assert job.stats.reused_positions >= owl.manifest.n_visual
        "".join(long)
        kept = set().union(*cached_pictures(owl).values())
        assert key_of(owl, 3) not in kept and key_of(owl, 2) in kept and key_of(owl, 1) in kept


def test_prefill_rides_with_running_streams_in_chunks_of_the_budget(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=2) as owl:
        owl.engine.prefill_chunk = 16
        steps: list[list[int]] = []
        real = owl.decoder.eval_sequences

        def recording(batch, *args, **kwargs):
            steps.append([sum(len(r) for r in runs) for _, runs in batch])
            return real(batch, *args, **kwargs)
        owl.decoder.eval_sequences = recording
        long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        streaming = owl.submit(owl.prepare(prompt("Talk.", 0), []), long)
        next(iter(streaming))               # decoding now
        late = owl.submit(owl.prepare(prompt("What is it?"), [picture(4)]), GREEDY)
        assert "".join(late) == alone(4, "What is it?")
        "".join(streaming)
        n_visual = owl.manifest.n_visual
        # While the stream decodes (its one token in every step), the prompt's text goes in
        # chunks of at most 16 positions; a picture is never split (it goes whole, alone).
        shared_steps = [s for s in steps if len(s) == 2]
        assert shared_steps, steps
        for step in shared_steps:
            prefill = max(step)
            assert prefill <= 16 or prefill == n_visual, steps
        assert streaming.stats.generated_tokens == 60


def test_a_cancel_in_the_middle_of_a_prefill_frees_the_sequence(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=2) as owl:
        owl.engine.prefill_chunk = 4
        gate, real = threading.Event(), owl.decoder.eval_sequences
        passes = []

        def counting(batch, *args, **kwargs):
            passes.append(len(batch))
            if len(passes) == 3:
                gate.set()
            return real(batch, *args, **kwargs)
        owl.decoder.eval_sequences = counting
        streaming = owl.submit(owl.prepare(prompt("Talk.", 0), []),
                               SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        next(iter(streaming))
        long_text = "Tell me about the picture in many words, please, " * 3
        job = owl.submit(owl.prepare(prompt(long_text), [picture(5)]), GREEDY)
        assert gate.wait(30)
        job.cancel()
        assert list(job) == [] and job.stats.generated_tokens == 0 and job.finished
        assert "decode" not in job.stats.timings  # it never decoded
        streaming.cancel()
        list(streaming)
        assert owl.engine.n_running == 0
        # The sequences are usable: a new question is answered as alone.
        assert ask(owl, 6, "What is it?")[0] == alone(6, "What is it?")


def test_a_prompt_longer_than_its_window_is_refused_at_submit(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=2) as owl:
        prepared = owl.prepare(prompt("What is it?"), [picture(1)])
        needed = sum(owl.manifest.n_visual if kind == "i" else 1 for kind, _ in prepared.items)
        with pytest.raises(ContextFullError, match=rf"the prompt needs {needed} positions .* an "
                                                   rf"answer may hold {needed - 1} \(n_ctx 256 shared"):
            owl.submit(prepared, GREEDY, window=needed - 1)
        assert "".join(owl.submit(prepared, GREEDY, window=needed + 6)) == alone(1, "What is it?")
        assert owl.engine.n_waiting == 0 and owl.engine.n_running == 0


def test_an_answer_that_waits_for_room_says_why(tiny_model_dir, alone):
    with load(tiny_model_dir, parallel=2) as owl:
        streaming = owl.submit(owl.prepare(prompt("Talk.", 0), []),
                               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        next(iter(streaming))
        # A window of the whole context cannot fit beside the running answer's.
        whole = owl.submit(owl.prepare(prompt("What is it?"), [picture(7)]), GREEDY,
                           window=2 * WINDOW)
        deadline = 200
        while owl.engine.queued() == [] or owl.engine.queued()[0]["waiting_for"] is None:
            deadline -= 1
            assert deadline, "the engine never tried to place the answer"
            threading.Event().wait(0.01)
        (queued,) = owl.engine.queued()
        assert queued["waiting_for"].startswith("room: running answers reserve 128 of n_ctx 256")
        assert queued["window"] == 2 * WINDOW
        "".join(streaming)
        assert "".join(whole) == alone(7, "What is it?")
        assert whole.waiting_for is None


def test_a_prefix_restored_from_the_disk_is_evaluated_no_more(tiny_model_dir, alone, tmp_path):
    cache = tmp_path / "cache"
    with load(tiny_model_dir, parallel=1, cache=cache) as owl:
        first, _ = ask(owl, 8, "What is it?")
        owl.disk.close()
    with load(tiny_model_dir, parallel=1, cache=cache) as owl:
        text, job = ask(owl, 8, "How many?")
        assert text == alone(8, "How many?")
        assert job.stats.disk_positions >= owl.manifest.n_visual
        assert job.stats.reused_positions == job.stats.disk_positions
    assert first == alone(8, "What is it?")
