"""Owl2.batch (owl2_edge/batch/engine.py): answers decoded together equal Owl2.ask's one by one,
bad items become error results while the others go on, and the Owl2 is whole afterwards."""

from __future__ import annotations

import io
import random

import pytest

from owl2_edge.batch.engine import BatchItem
from owl2_edge.errors import ArgumentError
from owl2_edge.owl2 import Owl2
from owl2_edge.scenes import random_scene

WINDOW = 160  # positions each answer may use (the tiny model's image takes n_visual of them)
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Describe it."]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = random.Random(0)
    paths = []
    for k in range(5):
        path = folder / f"scene{k}.png"
        random_scene(rng, "heldout").draw(64 + 16 * k).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def items(pictures):
    out = [BatchItem(k, p, QUESTIONS[k % len(QUESTIONS)]) for k, p in enumerate(pictures)]
    out.append(BatchItem(len(out), None, "Say something without a picture."))
    out.append(BatchItem(len(out), pictures[1], QUESTIONS[2]))  # an image seen before
    return out


@pytest.fixture(scope="module")
def asked(tiny_model_dir, items):
    """Each item's greedy answer from ask(), one at a time, at n_ctx = WINDOW."""
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=WINDOW) as owl:
        out = {}
        for item in items:
            answer = owl.ask([] if item.image is None else [item.image], item.question,
                             max_tokens=12, temperature=0)
            out[item.index] = (answer, owl.stats.finish_reason, owl.stats.generated_tokens)
        return out


def assert_all_idle(owl):
    """No answer holds a sequence; the cells in use are the idle sequences' kept prompts."""
    slots = owl.engine.slots()
    assert owl.engine.n_running == 0 and all(slot["state"] == "idle" for slot in slots)
    assert owl.decoder.n_ctx - owl.decoder.n_free <= sum(slot["positions"] for slot in slots)


def _batch(folder, items, parallel, **sampling):
    with Owl2.load(folder, device="cpu", kv_type="f32", n_ctx=WINDOW * parallel) as owl:
        results = list(owl.batch(items, parallel=parallel, **sampling))
        assert_all_idle(owl)
        return results, owl.decoder.n_ctx


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_batch_answers_equal_ask(tiny_model_dir, items, asked, parallel):
    results, _ = _batch(tiny_model_dir, items, parallel, max_tokens=12, temperature=0)
    assert sorted(r.index for r in results) == [i.index for i in items]
    for r in results:
        assert r.error is None, r.error
        assert (r.answer, r.finish_reason, r.completion_tokens) == asked[r.index], r.index
        assert r.prompt_tokens > 0 and r.timings["total"] >= r.timings["decode"] >= 0
        row = r.to_row()
        assert row["answer"] == r.answer and "error" not in row


def test_batch_takes_pairs_and_dicts(tiny_model_dir, items, asked):
    mixed = [(items[0].image, items[0].question), {"image": items[1].image, "question": items[1].question}]
    results, _ = _batch(tiny_model_dir, mixed, 2, max_tokens=12, temperature=0)
    assert {r.index: r.answer for r in results} == {0: asked[0][0], 1: asked[1][0]}
    assert results[0].image == str(items[results[0].index].image)


def test_bad_items_become_error_results_and_the_rest_answer(tiny_model_dir, items, asked, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    bad = [BatchItem(100, broken, "What?"), BatchItem(101, tmp_path / "missing.png", "What?"),
           BatchItem(102, items[0].image, "x " * 400),  # longer than one answer's share
           BatchItem(103, items[0].image, 7)]
    results, _ = _batch(tiny_model_dir, [*bad, *items[:3]], 2, max_tokens=12, temperature=0)
    by_index = {r.index: r for r in results}
    assert set(by_index) == {100, 101, 102, 103, 0, 1, 2}
    for k in (100, 101, 102, 103):
        r = by_index[k]
        assert r.answer is None and r.error and "\n" not in r.error, k
        assert set(r.to_row()) == {"index", "image", "question", "error"}
    assert "positions" in by_index[102].error
    for k in (0, 1, 2):
        assert by_index[k].answer == asked[k][0]


def test_an_answer_that_fills_its_share_stops_like_ask_at_that_context(tiny_model_dir, items):
    short = 70  # the image prompt plus a few tokens
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=short) as owl:
        alone = owl.ask(items[0].image, items[0].question, max_tokens=200, ignore_eos=True, temperature=0)
        reason = owl.stats.finish_reason
    assert reason == "context"
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=2 * short) as owl:
        results = list(owl.batch([items[0], items[2]], parallel=2, max_tokens=200, ignore_eos=True, temperature=0))
    r = next(r for r in results if r.index == 0)
    assert (r.answer, r.finish_reason) == (alone, "context")


def test_the_owl_is_whole_after_a_batch_stopped_early(tiny_model_dir, items, asked):
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=WINDOW * 2) as owl:
        results = owl.batch(items, parallel=2, max_tokens=12, temperature=0)
        first = next(results)
        results.close()  # stop after one: the others are cancelled, their sequences idle
        assert first.error is None
        assert_all_idle(owl)
        one = items[0]
        assert owl.ask(one.image, one.question, max_tokens=12, temperature=0) == asked[0][0]
        with pytest.raises(ArgumentError):
            owl.batch(items, parallel=0)
        with pytest.raises(ArgumentError):
            owl.batch(items, parallel=2, no_such_option=1)


def test_images_given_as_bytes_have_no_label(tiny_model_dir, items, asked):
    data = items[0].image.read_bytes()
    results, _ = _batch(tiny_model_dir, [BatchItem(0, io.BytesIO(data).getvalue(), items[0].question)],
                        1, max_tokens=12, temperature=0)
    assert results[0].image is None and results[0].answer == asked[0][0]


def test_questions_about_one_picture_share_its_prefill(tiny_model_dir, pictures):
    """Answers running together whose prompts start with the same picture share those cells
    (copy_sequence); the answers are still ask's."""
    questions = ["What color is the circle?", "How many shapes are there?", "What is it?",
                 "What shape is on the left?"]
    items = [BatchItem(k, pictures[0], q) for k, q in enumerate(questions)]
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=WINDOW) as owl:
        alone = {i.index: owl.ask(i.image, i.question, max_tokens=12, temperature=0) for i in items}
    # Two admitted together: the second waits one step, then shares the first's cells.
    results, _ = _batch(tiny_model_dir, items, 2, max_tokens=12, temperature=0)
    assert {r.index: r.answer for r in results} == alone
    reused = [r.reused_positions for r in results]
    assert max(reused) > 0 and all(r < r_.prompt_tokens for r, r_ in zip(reused, results))
