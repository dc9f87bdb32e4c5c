"""Reading a question's beginning ahead (Owl2.warm, Chat's read-ahead; issue 38): the picture
encoded and the prompt up to the question prefilled in steps no answer uses, so that the
question then evaluates only its own words. Checked on the tiny model's real decoder: the answer
is the same as unwarmed, the warm's cells are taken over, a warm yields to a running stream, a
question asked before the warm is done takes over what is done (one vision run in all), and a
dropped warm leaves nothing behind."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from owl2_edge.owl2 import Owl2
from owl2_edge.prompt import Turn, before_question, render
from owl2_edge.sampling import SamplingParams

GREEDY = dict(temperature=0, max_tokens=6)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def unwarmed(tiny_model_dir):
    """(seed, question, history) -> the greedy answer from a model that never warmed."""
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512) as owl:
        yield lambda seed, q, history=(): owl.ask(picture(seed), q, history=history, **GREEDY)


def load(folder, parallel: int = 2) -> Owl2:
    return Owl2.load(folder, device="cpu", kv_type="f32", n_ctx=256 * parallel,
                     parallel=parallel, cache=False)


def wait(job, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not job.finished:
        assert time.monotonic() < deadline, "the warm did not finish"
        time.sleep(0.01)


def test_the_question_after_a_warm_evaluates_only_its_own_words(tiny_model_dir, unwarmed):
    with load(tiny_model_dir) as owl:
        warm = owl.warm(picture(1))
        wait(warm)
        assert warm.stats.images_encoded == 1
        n_visual = owl.manifest.n_visual
        pieces = owl.stream(picture(1), "What is it?", **GREEDY)
        assert "".join(pieces) == unwarmed(1, "What is it?")
        stats = pieces.stats
        assert stats.images_encoded == 0                  # the warm's embeddings
        assert stats.reused_positions >= n_visual + 1     # "USER:" and the picture's cells
        assert stats.evaluated_positions == stats.prompt_positions - stats.reused_positions
        assert stats.evaluated_positions < 16


def test_a_warm_with_history_and_the_prompt_it_stands_for(tiny_model_dir, unwarmed):
    history = [("Hello.", "Hi.")]
    prefix = before_question([Turn("Hello.", "Hi."), Turn("")], n_images=1)
    whole = render([Turn("Hello.", "Hi."), Turn("Which one?")], n_images=1)
    assert whole.startswith(prefix) and whole[len(prefix):].startswith("Which one?")
    with load(tiny_model_dir) as owl:
        wait(owl.warm(picture(2), history=history))
        pieces = owl.stream(picture(2), "Which one?", history=history, **GREEDY)
        assert "".join(pieces) == unwarmed(2, "Which one?", history)
        assert pieces.stats.evaluated_positions < 16


def test_a_warm_waits_while_an_answer_streams(tiny_model_dir, unwarmed):
    with load(tiny_model_dir) as owl:
        long = owl.stream(None, "Talk.", temperature=0, max_tokens=40, ignore_eos=True)
        texts = [next(long)]                              # decoding now
        warm = owl.warm(picture(3))
        for _ in range(20):
            texts.append(next(long))
            assert not warm.finished                      # no step of it while the stream runs
        texts.extend(long)
        assert long.stats.generated_tokens == 40
        wait(warm)                                        # and it runs once the stream is done
        assert owl.ask(picture(3), "What is it?", **GREEDY) == unwarmed(3, "What is it?")
        assert owl.stats.reused_positions >= owl.manifest.n_visual


def test_a_question_before_the_warm_is_done_takes_it_over(tiny_model_dir, unwarmed):
    with load(tiny_model_dir) as owl:
        owl.engine.prefill_chunk = 8                      # the warm goes in many small steps
        warm = owl.warm(picture(4))
        pieces = owl.stream(picture(4), "What is it?", **GREEDY)
        assert "".join(pieces) == unwarmed(4, "What is it?")
        wait(warm)
        # One vision run in all, and no position evaluated twice.
        assert warm.stats.images_encoded + pieces.stats.images_encoded == 1
        total = pieces.stats.prompt_positions
        assert pieces.stats.evaluated_positions + pieces.stats.reused_positions == total


def test_a_dropped_warm_leaves_nothing_running(tiny_model_dir, unwarmed):
    with load(tiny_model_dir) as owl:
        long = owl.stream(None, "Talk.", temperature=0, max_tokens=20, ignore_eos=True)
        next(long)
        warm = owl.warm(picture(5))
        warm.cancel()
        "".join(long)
        wait(warm)
        assert owl.engine.n_running == 0 and owl.engine.n_waiting == 0
        assert owl.ask(picture(5), "What is it?", **GREEDY) == unwarmed(5, "What is it?")


def test_a_chat_reads_its_pictures_ahead(tiny_model_dir, unwarmed):
    with load(tiny_model_dir) as owl:
        chat = owl.chat(picture(6))
        wait(chat.warming)
        first = "".join(chat.send("What is it?", **GREEDY))
        assert first == unwarmed(6, "What is it?")
        assert chat.stats.images_encoded == 0 and chat.stats.evaluated_positions < 16
        chat.add_image(picture(7))                        # the next turn's picture, read ahead
        wait(chat.warming)
        "".join(chat.send("And this one?", **GREEDY))
        assert chat.stats.images_encoded == 0
        assert chat.stats.evaluated_positions < 16
        # Without a picture nothing is read ahead; clearing drops the conversation.
        chat.clear()
        assert chat.warming is None
        assert owl.chat(picture(6), warm=False).warming is None  # `owl2 chat --no-warm`


def test_warming_never_changes_an_answer_with_sampling(tiny_model_dir):
    params = dict(temperature=0.9, seed=5, max_tokens=8)
    with load(tiny_model_dir) as owl:
        cold = owl.ask(picture(8), "Describe.", **params)
    with load(tiny_model_dir) as owl:
        wait(owl.warm(picture(8)))
        assert owl.ask(picture(8), "Describe.", **params) == cold
    assert SamplingParams(**params).seed == 5


def test_opening_the_vision_session_silences_only_its_own_thread(capsys):
    """The vision model may open on the vision worker's thread while the main thread prints (a
    chat's ">>> " prompt, read ahead from its picture): only the opening thread is silenced."""
    import threading

    from owl2_edge.vision import _this_thread_quiet
    inside, done = threading.Event(), threading.Event()

    def opening():
        with _this_thread_quiet():
            print("EP Error: dropped")
            inside.set()
            done.wait(10)

    worker = threading.Thread(target=opening)
    worker.start()
    inside.wait(10)
    print(">>> ", end="")  # the main thread, meanwhile
    done.set()
    worker.join()
    assert capsys.readouterr().out == ">>> "


# -- the server's POST /v1/warm and the disk ---------------------------------------------------------

def _data_url(image) -> str:
    import base64
    import io
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _post(url: str, path: str, body) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _pictures_only(seed: int) -> dict:
    return {"role": "user", "content": [{"type": "image_url",
                                         "image_url": {"url": _data_url(picture(seed))}}]}


def test_the_servers_warm_serves_the_question_sent_later(tiny_server):
    owl = tiny_server.owl
    status, warmed = _post(tiny_server.url, "/v1/warm", {"messages": [_pictures_only(9)]})
    assert status == 200 and warmed["object"] == "warm" and warmed["images"] == 1
    assert warmed["prompt_positions"] > owl.manifest.n_visual
    deadline = time.monotonic() + 60
    while owl.engine.n_running or owl.engine.n_waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    question = _pictures_only(9)
    question["content"].append({"type": "text", "text": "What is it?"})
    status, reply = _post(tiny_server.url, "/v1/chat/completions",
                          {"messages": [question], "temperature": 0, "max_tokens": 6})
    assert status == 200, reply
    assert reply["timings"]["cache_n"] >= warmed["prompt_positions"] - 1
    assert reply["timings"]["images_encoded"] == 0
    assert reply["choices"][0]["message"]["content"] == \
        owl.ask(picture(9), "What is it?", temperature=0, max_tokens=6)


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "a question"}]}]}, "messages"),
    ({"messages": [], "model": "x"}, "messages"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     None),  # not a picture: refused as on the chat route
    ({"messages": "x"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}], "temperature": 0}, "temperature"),
])
def test_a_warm_it_cannot_take_is_refused_by_name(tiny_server, body, param):
    status, answer = _post(tiny_server.url, "/v1/warm", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_the_server_keeps_at_most_parallel_warms_going(start_server):
    with start_server(parallel=1) as s:
        long = s.owl.stream(None, "Talk.", temperature=0, max_tokens=30, ignore_eos=True)
        next(long)                                        # the warms wait behind it
        for seed in (20, 21, 22):
            assert _post(s.url, "/v1/warm", {"messages": [_pictures_only(seed)]})[0] == 200
        assert sum(not j.finished for j in s.app.state.server.warms) <= 1
        "".join(long)


def test_a_warm_survives_a_restart_through_the_disk_cache(tiny_model_dir, tmp_path):
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512,
                   cache=tmp_path) as owl:
        wait(owl.warm(picture(10)))
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=512,
                   cache=tmp_path) as fresh:
        pieces = fresh.stream(picture(10), "What is it?", **GREEDY)
        "".join(pieces)
        assert pieces.stats.disk_positions >= fresh.manifest.n_visual
        assert pieces.stats.images_encoded == 0


def test_the_demo_answers_the_same_with_and_without_warming(demo_model_dir):
    """Greedy answers of the trained demo model, each question asked about a picture read
    ahead and about the same picture in a process that never warmed: equal, and right."""
    from owl2_edge.scenes import Scene, Thing
    scene = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)
    questions = {"What color is the square?": "Red.", "How many shapes are there?": "Two."}
    with Owl2.load(demo_model_dir, device="cpu", cache=False) as cold:
        expected = {q: cold.ask(scene.draw(224), q, temperature=0) for q in questions}
    assert expected == questions
    with Owl2.load(demo_model_dir, device="cpu", cache=False) as owl:
        for q in questions:
            chat = owl.chat(scene.draw(224))
            wait(chat.warming)
            assert "".join(chat.send(q, temperature=0)) == expected[q]
            assert chat.stats.images_encoded == 0
