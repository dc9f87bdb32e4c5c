"""`owl2 serve` against a real server (uvicorn on a thread, conftest's start_server) on the tiny
model, through the official `openai` client where it can send the request and raw HTTP where it
would refuse to: answers equal the Python API's, the caches serve repeated images and
conversation prefixes, every refusal has its status and OpenAI's error shape and leaves the
server working, a client that leaves frees the model, the API key and the queue's bound hold."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")

import numpy as np  # noqa: E402
from conftest import hold_slot, like_a_terminal, slow_steps  # noqa: E402
from PIL import Image  # noqa: E402

from owl2_edge.serve.fetch import parse_networks  # noqa: E402
from owl2_edge.serve.limits import Limits  # noqa: E402

N = 12  # tokens per answer: short, and long enough for the answers to differ
QUESTION = "What is this?"
# Small limits, so that the refusals are cheap to provoke.
LIMITS = Limits(max_queue=4, max_body_bytes=256 * 1024, max_images=3, max_tokens=900,
                max_image_bytes=64 * 1024, max_image_pixels=512 * 512)


def png(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED, BLUE = png(), png((20, 40, 220), (30, 50))


def user(*images: bytes, text: str = QUESTION) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """Raw POST: (status, JSON body). `body`: bytes as they are, anything else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json",
                                                        **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}),
                                    timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metrics(url: str) -> dict:
    return get(url, "/metrics?format=json")[1]


def greedy(**kw) -> dict:
    return {"model": "any-name", "temperature": 0, "max_tokens": N, **kw}


def assert_error_shape(body: dict, status: int):
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    expected = {400: "invalid_request_error", 413: "invalid_request_error",
                401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error",
                500: "server_error", 503: "timeout_error"}[status]
    assert error["type"] == expected


@pytest.fixture(scope="module")
def served(start_server):
    with start_server(limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def api(served):
    return client(served.url)


def python_answer(owl, messages) -> str:
    reply = owl.create_chat_completion(messages, temperature=0, max_tokens=N)
    return reply["choices"][0]["message"]["content"]


# -- answers ---------------------------------------------------------------------------------------

def test_plain_and_streamed_answers_equal_the_python_apis_greedy_answer(owl, api):
    messages = [user(RED)]
    expected = python_answer(owl, messages)
    assert expected

    reply = api.chat.completions.create(messages=messages, **greedy())
    assert reply.object == "chat.completion" and reply.model == "tiny-F32"
    assert reply.choices[0].message.content == expected
    # The tiny model's greedy answer to this picture runs past N tokens: cut, at exactly N.
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == N
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    timings = reply.model_extra["timings"]
    assert {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
            "predicted_per_second", "cache_n", "queue_ms"} <= set(timings)
    assert timings["predicted_n"] == reply.usage.completion_tokens

    chunks = list(api.chat.completions.create(messages=messages, stream=True, **greedy()))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
    last = chunks[-1]
    assert last.choices[0].finish_reason == reply.choices[0].finish_reason
    assert last.usage.completion_tokens == reply.usage.completion_tokens
    assert last.model_extra["timings"]["cache_n"] > 0  # the same prompt again: from the cache


def test_text_completion_takes_a_raw_prompt_with_image_marks(owl, api):
    prompt = "USER: <|image|>Describe it. ASSISTANT:"
    expected = "".join(owl.stream([RED], prompt, raw=True, temperature=0, max_tokens=N))
    reply = api.completions.create(prompt=prompt, extra_body={"images": [data_url(RED)]},
                                   **greedy())
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected
    streamed = list(api.completions.create(prompt=prompt, stream=True,
                                           extra_body={"images": [base64.b64encode(RED).decode()]},
                                           **greedy()))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_two_images_in_one_message(owl, api, served):
    before = metrics(served.url)
    messages = [user(RED, BLUE, text="What changed?")]
    reply = api.chat.completions.create(messages=messages, **greedy())
    assert reply.choices[0].message.content == python_answer(owl, messages)
    after = metrics(served.url)
    assert after["images"] - before["images"] == 2
    n_visual = served.owl.manifest.n_visual
    assert reply.usage.prompt_tokens > 2 * n_visual


def test_a_follow_up_turn_reuses_the_image_and_the_conversation(owl, api, served):
    picture = png((10, 200, 90), (33, 44))  # seen by no other test
    first = [user(picture)]
    before = metrics(served.url)
    one = api.chat.completions.create(messages=first, **greedy())
    middle = metrics(served.url)
    assert middle["vision_runs"] - before["vision_runs"] == 1

    follow_up = first + [{"role": "assistant", "content": one.choices[0].message.content},
                         {"role": "user", "content": "And what colour is it?"}]
    two = api.chat.completions.create(messages=follow_up, **greedy())
    after = metrics(served.url)
    assert two.choices[0].message.content == python_answer(owl, follow_up)
    # Neither re-encoded nor re-prefilled: the image came from the vision cache, and the first
    # turn's prompt (image included) from the KV cache.
    assert after["vision_runs"] == middle["vision_runs"]
    assert after["image_cache_hits"] - middle["image_cache_hits"] == 1
    cached = two.model_extra["timings"]["cache_n"]
    assert cached >= one.usage.prompt_tokens - 1
    assert after["prompt_positions_reused"] - middle["prompt_positions_reused"] == cached
    assert two.model_extra["timings"]["prompt_n"] == two.usage.prompt_tokens - cached


def test_stop_strings_end_the_answer_before_them(owl, api):
    messages = [user(RED)]
    full = python_answer(owl, messages)
    cut = len(full) // 2
    stop = full[cut:cut + 2]
    expected = full[:full.index(stop)].strip()
    reply = api.chat.completions.create(messages=messages, stop=[stop, "never-there"], **greedy())
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(messages=messages, stop=stop, stream=True,
                                              **greedy()))
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_what_clients_send_by_default_and_any_model_name_are_accepted(owl, api):
    messages = [{"role": "system", "content": "Be brief."}, user(RED)]
    reply = api.chat.completions.create(
        messages=messages, frequency_penalty=0,
        presence_penalty=0.0, logit_bias={}, tools=[], response_format={"type": "text"},
        user="someone", seed=3, top_p=0.9, n=1,
        extra_body={"min_p": 0.05, "top_k": 20, "repeat_penalty": 1.1},
        **{**greedy(), "model": "gpt-4o"})
    # Accepted and honoured: the neutral values change nothing and greedy ignores the sampler's
    # truncation, so the answer is the Python API's for the same messages and repeat_penalty;
    # the system message counts (without it the answer differs: the comparison can fail).
    expected = owl.create_chat_completion(messages, temperature=0, max_tokens=N,
                                          repeat_penalty=1.1)["choices"][0]["message"]["content"]
    assert reply.choices[0].message.content == expected
    assert expected != python_answer(owl, [user(RED)])


def test_an_unknown_field_is_refused_not_ignored(api):
    for extra in ({"whatever": {"x": 1}}, {"temprature": 0.5}, {"mirostat": 2}):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(messages=[user()], extra_body=extra, **greedy())
        assert e.value.body["param"] == next(iter(extra))
        assert e.value.body["code"] == "unknown_field"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(prompt="Hi", extra_body={"messages": []}, **greedy())
    assert e.value.body["param"] == "messages"


# -- refusals --------------------------------------------------------------------------------------

BAD = {
    "body too large": (413, b'{"messages": "' + b"x" * (300 * 1024) + b'"}', "body_too_large"),
    "not JSON": (400, b'{"messages": [', "invalid_json"),
    "NaN is not JSON": (400, b'{"messages": [], "temperature": NaN}', "invalid_json"),
    "not an object": (400, [1, 2], "invalid_json"),
    "no messages": (400, {"model": "x"}, "messages"),
    "messages not a list": (400, {"messages": "hi"}, "messages"),
    "a message of no role": (400, {"messages": [{"content": "hi"}]}, "messages"),
    "temperature a string": (400, {"messages": [user()], "temperature": "0"}, "temperature"),
    "top_p out of range": (400, {"messages": [user()], "top_p": 2}, "top_p"),
    "n of 9": (400, {"messages": [user()], "n": 9}, "n"),
    "n of 0": (400, {"messages": [user()], "n": 0}, "n"),
    "frequency_penalty out of range": (400, {"messages": [user()], "frequency_penalty": 2.5},
                                       "frequency_penalty"),
    "presence_penalty out of range": (400, {"messages": [user()], "presence_penalty": -3},
                                      "presence_penalty"),
    "logit_bias of no token": (400, {"messages": [user()], "logit_bias": {"x": 1}}, "logit_bias"),
    "logit_bias beyond the vocabulary": (400, {"messages": [user()],
                                               "logit_bias": {"9999999": 1}}, "logit_bias"),
    "logit_bias out of range": (400, {"messages": [user()], "logit_bias": {"5": 101}},
                                "logit_bias"),
    "logprobs not a flag": (400, {"messages": [user()], "logprobs": "yes"}, "logprobs"),
    "top_logprobs above 20": (400, {"messages": [user()], "logprobs": True, "top_logprobs": 21},
                              "top_logprobs"),
    "top_logprobs without logprobs": (400, {"messages": [user()], "top_logprobs": 2},
                                      "top_logprobs"),
    "a tool of no known type": (400, {"messages": [user()], "tools": [{"type": "retrieval"}]},
                                "tools"),
    "a tool whose name is not a name": (400, {"messages": [user()], "tools": [
        {"type": "function", "function": {"name": "a b"}}]}, "tools"),
    "a tool whose parameters cannot compile": (400, {"messages": [user()], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        "tools"),
    "tool_choice of no tool": (400, {"messages": [user()], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, "tool_choice"),
    "tools beside a grammar": (400, {"messages": [user()], "tools": [
        {"type": "function", "function": {"name": "f"}}], "grammar": 'root ::= "a"'}, "tools"),
    "functions (the older form)": (400, {"messages": [user()], "functions": [{"name": "f"}]},
                                   "functions"),
    "response_format of no known type": (400, {"messages": [user()], "response_format": {
        "type": "xml"}}, "response_format.type"),
    "a schema that cannot compile": (400, {"messages": [user()], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
        "response_format.json_schema.schema"),
    "a grammar that cannot compile": (400, {"messages": [user()], "grammar": "root ::= nothere"},
                                      "grammar"),
    "two constraints": (400, {"messages": [user()], "grammar": 'root ::= "a"',
                              "json_schema": {"type": "object"}}, "grammar"),
    "stream not a flag": (400, {"messages": [user()], "stream": "yes"}, "stream"),
    "stop not strings": (400, {"messages": [user()], "stop": [1]}, "stop"),
    "max_tokens above the limit": (400, {"messages": [user()], "max_tokens": 901}, "max_tokens"),
    "too many images": (400, {"messages": [user(RED, RED, RED, RED)]}, "too_many_images"),
    "image too many bytes": (413, {"messages": [user(os.urandom(70 * 1024))]}, "image_too_large"),
    "image too many pixels": (400, {"messages": [user(png(1, (600, 600), "1"))]},
                              "image_too_large"),
    "image not base64": (400, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
        "invalid_image"),
    "image not a picture": (400, {"messages": [user(b"not a picture at all")]}, "image_error"),
    "file:// not allowed": (400, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]},
        "path_not_allowed"),
    "http(s) not allowed": (400, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
        "remote_not_allowed"),
    "prompt over the context": (400, {"messages": [user(text="word " * 1100)]},
                                "context_full_error"),
}


@pytest.fixture(scope="module")
def plain_answer(owl) -> str:
    """The Python API's greedy answer to [user()]: what a server that still works answers."""
    return python_answer(owl, [user()])


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_request_gets_its_status_and_error_shape_and_the_next_one_works(
        served, plain_answer, case):
    status, body, what = BAD[case]
    got, reply = post(served.url, "/v1/chat/completions", body)
    assert got == status, reply
    assert_error_shape(reply, status)
    assert what in (reply["error"]["param"], reply["error"]["code"]), reply
    good, answer = post(served.url, "/v1/chat/completions", {"messages": [user()], **greedy()})
    assert good == 200 and answer["choices"][0]["message"]["content"] == plain_answer


def test_bad_text_completions_and_routes_are_refused_in_the_same_shape(served):
    cases = [
        ("/v1/completions", {"images": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "images": "a"}, 400, "images"),
        ("/v1/completions", {"prompt": "<|image|><|image|>", "images": [data_url(RED)]}, 400,
         "prompt_error"),
        ("/v1/nothing", {}, 404, None),
    ]
    for path, body, status, what in cases:
        got, reply = post(served.url, path, body)
        assert got == status, (path, body, reply)
        assert_error_shape(reply, status)
        assert what in (None, reply["error"]["param"], reply["error"]["code"]), reply
    got, reply = get(served.url, "/v1/chat/completions")
    assert got == 405
    assert_error_shape(reply, 405)
    with pytest.raises(openai.BadRequestError) as e:
        client(served.url).chat.completions.create(messages=[user()], **greedy(max_tokens=10**6))
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_images_from_allowed_folders_and_remote_urls(start_server, tmp_path, owl):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "red.png").write_bytes(RED)
    (elsewhere / "red.png").write_bytes(RED)
    (allowed / "escape.png").symlink_to(elsewhere / "red.png")
    (allowed / "big.png").write_bytes(os.urandom(70 * 1024))

    def ask(url):
        return post(s.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": QUESTION}]}], **greedy()})

    handler = functools.partial(_QuietHandler, directory=str(allowed))
    with start_server(limits=LIMITS, allow_paths=[allowed], allow_remote_images=True,
                      allow_networks=parse_networks(["127.0.0.1"])) as s, \
            _QuietServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        web = f"http://127.0.0.1:{files.server_address[1]}"
        expected = python_answer(owl, [user(RED)])
        for url in (f"file://{allowed}/red.png", f"{web}/red.png"):
            status, reply = ask(url)
            assert status == 200, reply
            assert reply["choices"][0]["message"]["content"] == expected
        for url, status, code in [(f"file://{elsewhere}/red.png", 400, "path_not_allowed"),
                                  (f"file://{allowed}/escape.png", 400, "path_not_allowed"),
                                  (f"file://{allowed}/missing.png", 400, "invalid_image"),
                                  (f"file://{allowed}/big.png", 413, "image_too_large"),
                                  (f"{web}/big.png", 413, "image_too_large"),
                                  (f"{web}/missing.png", 400, "image_download_failed")]:
            got, reply = ask(url)
            assert (got, reply["error"]["code"]) == (status, code), (url, reply)
        files.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hung up on a file over its limit: as intended


def test_an_error_after_a_streams_200_is_its_last_event_and_the_model_is_freed(
        start_server, monkeypatch, plain_answer):
    with start_server() as s:
        real, passes = s.owl.decoder.eval_sequences, []

        def nan_at_the_third(batch, *args, **kwargs):  # a damaged weight, as the engine sees it
            logits = real(batch, *args, **kwargs)
            passes.append(1)
            return logits * np.nan if len(passes) == 3 else logits

        monkeypatch.setattr(s.owl.decoder, "eval_sequences", nan_at_the_third)
        body = {"messages": [user()], "stream": True, **greedy(), "ignore_eos": True}
        request = urllib.request.Request(s.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200
            events = [line[6:] for line in r.read().decode().splitlines() if line]
        last = json.loads(events[-1])
        assert_error_shape(last, 500)
        assert last["error"]["code"] == "decoder_error" and "[DONE]" not in events
        monkeypatch.undo()
        reply = client(s.url).chat.completions.create(messages=[user()], **greedy())
        assert reply.choices[0].message.content == plain_answer   # no NaN cell left behind
        m = metrics(s.url)
        assert (m["stream_errors"], m["disconnects"], m["answers"]) == (1, 0, 2)


# -- the model's time: disconnects, the queue, the key --------------------------------------------

def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def _wait_for(url: str, condition, what: str) -> dict:
    deadline = time.monotonic() + 60
    while True:
        m = metrics(url)
        if condition(m):
            return m
        assert time.monotonic() < deadline, f"never: {what}: {m}"
        time.sleep(0.02)


def test_a_client_that_leaves_mid_stream_stops_its_answer_and_frees_the_model(served, api, owl):
    before = metrics(served.url)
    many = LIMITS.max_tokens
    sock = _raw_request(served.url, {"messages": [user(RED)], "stream": True, **greedy(),
                                     "max_tokens": many, "ignore_eos": True})
    received = b""
    while received.count(b"data: ") < 4:
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()

    # The next request is served (it would wait behind a still-running answer).
    reply = api.chat.completions.create(messages=[user(BLUE)], **greedy())
    assert reply.choices[0].message.content == python_answer(owl, [user(BLUE)])
    after = _wait_for(served.url, lambda m: m["answers"] - before["answers"] == 2, "two answers")
    assert after["disconnects"] - before["disconnects"] == 1
    left = after["tokens_generated"] - before["tokens_generated"] - reply.usage.completion_tokens
    assert 3 <= left < many
    time.sleep(0.2)
    assert metrics(served.url)["tokens_generated"] == after["tokens_generated"]


def test_a_client_that_leaves_a_plain_request_stops_its_answer_too(start_server, monkeypatch):
    with start_server() as s:
        slow_steps(monkeypatch, s.owl, 0.02)  # an answer that lasts while the client leaves
        before = metrics(s.url)
        many = LIMITS.max_tokens
        sock = _raw_request(s.url, {"messages": [user(RED)], **greedy(), "max_tokens": many,
                                    "ignore_eos": True})
        _wait_for(s.url, lambda m: m["queue"]["busy"], "the request has a slot")
        sock.close()
        after = _wait_for(s.url, lambda m: m["disconnects"] > before["disconnects"]
                          and not m["queue"]["busy"], "the request was dropped")
        assert after["disconnects"] - before["disconnects"] == 1
        assert after["tokens_generated"] - before["tokens_generated"] < many


def test_a_client_that_leaves_while_queued_gives_up_its_place(start_server):
    with start_server() as s, hold_slot(s.owl):
        before = metrics(s.url)
        sock = _raw_request(s.url, {"messages": [user()], **greedy()})
        _wait_for(s.url, lambda m: m["queue"]["waiting"] == 1, "the request waits for a slot")
        sock.close()
        after = _wait_for(s.url, lambda m: m["queue"]["waiting"] == 0, "the request left")
        assert after["disconnects"] - before["disconnects"] == 1
        assert after["tokens_generated"] == before["tokens_generated"]


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_request_is_then_served(
        start_server):
    with start_server(limits=Limits(max_queue=1)) as s:
        results = {}

        def ask(name):
            results[name] = post(s.url, "/v1/chat/completions", {"messages": [user()], **greedy()})

        with hold_slot(s.owl):  # the one slot is busy until the block ends
            first = threading.Thread(target=ask, args=("first",))
            first.start()
            _wait_for(s.url, lambda m: m["queue"]["waiting"] == 1, "the first request waits")
            with pytest.raises(openai.RateLimitError) as e:
                client(s.url).with_options(max_retries=0).chat.completions.create(
                    messages=[user()], **greedy())
            assert e.value.status_code == 429
            assert_error_shape(e.value.response.json(), 429)
            assert e.value.body["code"] == "queue_full"
            assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
        first.join(60)
        assert results["first"][0] == 200
        m = metrics(s.url)
        assert m["queue"]["rejected"] == 1 and m["queue"]["waits"] >= 1
        assert m["errors"] == {"429": 1}


def test_the_api_key_is_required_except_for_health_and_the_page(start_server, plain_answer):
    with start_server(api_key="sekret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s.url, "wrong").chat.completions.create(messages=[user()], **greedy())
        assert e.value.status_code == 401
        status, body = post(s.url, "/v1/chat/completions", {"messages": [user()]})
        assert status == 401 and body["error"]["code"] == "missing_api_key"
        assert_error_shape(body, 401)
        assert get(s.url, "/metrics?format=json")[0] == 401
        reply = client(s.url, "sekret").chat.completions.create(messages=[user()], **greedy())
        assert reply.choices[0].message.content == plain_answer
        assert get(s.url, "/metrics?format=json", {"Authorization": "Bearer sekret"})[0] == 200
        assert get(s.url, "/health") == (200, {"status": "ok"})
        with urllib.request.urlopen(s.url + "/", timeout=60) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")


# -- the server's own routes -----------------------------------------------------------------------

def test_models_health_props_and_metrics(tiny_server):
    url = tiny_server.url
    assert get(url, "/health") == (200, {"status": "ok"})
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny-F32"]
    status, props = get(url, "/props")
    assert status == 200
    assert props["model"]["n_visual"] == tiny_server.owl.manifest.n_visual
    assert props["model"]["n_ctx"] == 1024 and props["modalities"]["vision"]
    assert props["limits"]["max_queue"] == Limits().max_queue
    assert props["concurrency"]["parallel"] == 1 and props["concurrency"]["window"] == 1024
    assert props["queue"] == {"busy": 0, "waiting": 0, "max_waiting": Limits().max_queue,
                              "parallel": 1}
    assert "functions" in props["unsupported_fields"]
    assert "tool_choice" in " ".join(props["supported_fields"])
    assert "frequency_penalty" in " ".join(props["supported_fields"])
    m = metrics(url)
    assert {"requests", "errors", "images", "vision_runs", "image_cache_hits",
            "prompt_positions_evaluated", "prompt_positions_reused", "tokens_generated",
            "queue"} <= set(m)


# -- the command -----------------------------------------------------------------------------------

def owl2(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=like_a_terminal, **kwargs)


def test_owl2_serve_prints_its_url_serves_and_stops_quietly_on_ctrl_c(tiny_model_dir):
    proc = owl2("serve", "-m", tiny_model_dir, "--device", "cpu", "--port", "0")
    try:
        line = proc.stdout.readline()
        url = line.split()[2].rstrip("/")
        assert line.startswith("owl2 serve: http://127.0.0.1:"), line
        assert get(url, "/health") == (200, {"status": "ok"})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err == ""


@pytest.mark.parametrize("args, message", [
    (["--max-queue", "-1"], "error: --max-queue must be"),
    (["--allow-path", "/no/such/folder"], "error: --allow-path /no/such/folder: not a folder"),
    (["--port", "70000"], "error: --port must be"),
])
def test_owl2_serve_refuses_bad_options_in_one_line(tiny_model_dir, args, message):
    out, err = owl2("serve", "-m", tiny_model_dir, *args).communicate(timeout=60)
    assert err.startswith(message) and err.count("\n") == 1, err


def test_owl2_serve_refuses_a_port_in_use(tiny_model_dir):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = owl2("serve", "-m", tiny_model_dir, "--port", port)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"



# -- many at once: slots, the engine's metrics ------------------------------------------------------

def test_with_two_slots_a_request_is_answered_while_another_holds_one(start_server):
    with start_server(parallel=2) as s, hold_slot(s.owl):
        status, reply_ = post(s.url, "/v1/chat/completions", {"messages": [user()], **greedy()})
        assert status == 200 and reply_["choices"][0]["message"]["content"]
        slots = get(s.url, "/props")[1]["concurrency"]["slots"]
        assert [slot["state"] for slot in slots].count("prefill") == 1  # the held one


def test_metrics_are_prometheus_text_with_slots_queue_and_latency_histograms(start_server):
    with start_server(parallel=2) as s:
        client(s.url).chat.completions.create(messages=[user()], **greedy(max_tokens=6))
        list(client(s.url).chat.completions.create(messages=[user()], stream=True,
                                                   **greedy(max_tokens=6)))
        with urllib.request.urlopen(s.url + "/metrics", timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["owl2:slots_total"] == 2 and samples["owl2:slots_busy"] == 0
    assert samples["owl2:requests_waiting"] == 0
    assert samples["owl2:answers_total"] == 2
    assert samples["owl2:time_to_first_token_seconds_count"] == 2
    assert samples['owl2:time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    generated = samples["owl2:tokens_predicted_total"]
    assert 2 <= generated <= 12
    # Each answer's tokens after its first are timed from the one before.
    assert samples["owl2:inter_token_seconds_count"] == generated - 2
    assert samples["owl2:predicted_tokens_seconds"] > 0
    assert "# TYPE owl2:inter_token_seconds histogram" in text
