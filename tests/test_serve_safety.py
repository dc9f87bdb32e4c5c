"""`owl2 serve` left running (docs/serve-safety.md): a request that cannot fit is refused before
the work that its size would cost, and its memory comes back; remote images come from public
addresses only and within their deadline; the request time limit holds; a web page cannot drive
the server; no input is a 500; usage comes as OpenAI streams it.

All traffic is on loopback: the servers run on 127.0.0.1 (conftest's start_server), and remote
names resolve through a stub resolver whose connections a spy refuses outside loopback.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")

from owl2_edge.errors import ArgumentError, ContextFullError  # noqa: E402
from owl2_edge.sampling import SamplingParams  # noqa: E402
from owl2_edge.serve.fetch import Fetcher, parse_networks  # noqa: E402
from owl2_edge.serve.limits import Limits  # noqa: E402
from conftest import hold_slot, slow_steps  # noqa: E402
from test_serve import (RED, assert_error_shape, client, data_url, get, greedy, metrics,  # noqa: E402
                        post, user)
from test_serve_fetch import ConnectSpy, LoopbackServer, drip_body, reply, stub_resolver  # noqa: E402


def raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None
        ) -> tuple[int, dict, bytes]:
    """A request with exactly these headers (urllib would add its own Host): status, headers,
    body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        lines = [f"{method} {path} HTTP/1.1", "Connection: close",
                 f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if found.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    return int(status_line.split()[1]), found, payload


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2:]
    return out


def hosted(url: str) -> str:
    return url.removeprefix("http://")


CHAT = "/v1/chat/completions"
ASK = json.dumps({"messages": [user()], **greedy()}).encode()


# -- refusing early and cheaply -------------------------------------------------------------------

@pytest.fixture
def tokenized(tiny_server, monkeypatch):
    """Every prompt the server tokenizes: (characters, thread name)."""
    seen = []
    real = tiny_server.owl.tokenize

    def spy(prompt):
        seen.append((len(prompt), threading.current_thread().name))
        return real(prompt)
    monkeypatch.setattr(tiny_server.owl, "tokenize", spy)
    return seen


def too_long_requests(owl) -> dict[str, tuple[str, dict]]:
    most = owl.max_prompt_chars()
    n_visual = owl.manifest.n_visual
    images_only = owl.decoder.n_ctx // n_visual + 1
    return {
        "one long message": (CHAT, {"messages": [user(text="a" * (most + 1))]}),
        "far past the limit": (CHAT, {"messages": [user(text="word " * 1_000_000)]}),
        "many messages": (CHAT, {"messages": [{"role": "user", "content": "b" * 1000}] *
                                 (most // 1000 + 2)}),
        "a long system message": (CHAT, {"messages": [{"role": "system", "content": "c" * most},
                                                      user(text="hi")]}),
        "multibyte characters": (CHAT, {"messages": [user(text="🦉é" * most)]}),
        "text parts": (CHAT, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "d" * (most // 2 + 1)}] * 2}]}),
        "a raw prompt": ("/v1/completions", {"prompt": "e" * (most + 1)}),
        "a raw prompt with image marks": (
            "/v1/completions", {"prompt": "<|image|>" + "f" * most,
                                "images": [data_url(RED)]}),
        "more images than positions": (
            "/v1/completions", {"prompt": "<|image|>" * images_only,
                                "images": [data_url(RED)] * images_only}),
    }


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(start_server, monkeypatch):
    limits = Limits(max_images=512)
    with start_server(limits=limits) as s:
        seen, real = [], s.owl.tokenize
        monkeypatch.setattr(s.owl, "tokenize", lambda p: seen.append(len(p)) or real(p))
        before = metrics(s.url)
        for name, (path, body) in too_long_requests(s.owl).items():
            status, reply_ = post(s.url, path, {**body, **greedy()})
            assert status == 400, (name, reply_)
            assert reply_["error"]["code"] == "context_full_error", (name, reply_)
            assert_error_shape(reply_, 400)
        assert seen == []  # not one of them was tokenized
        after = metrics(s.url)
        assert after["answers"] == before["answers"] and after["queue"]["waits"] == 0
        # The one just under the bound is tokenized, and refused by its real length.
        bound = s.owl.max_prompt_chars()
        status, reply_ = post(s.url, "/v1/completions", {"prompt": "g " * (bound // 2 - 8),
                                                         **greedy()})
        assert status == 400 and reply_["error"]["code"] == "context_full_error"
        assert len(seen) == 1 and seen[0] <= bound


def test_prompts_are_tokenized_off_the_model_thread(tiny_server, tokenized):
    status, _ = post(tiny_server.url, CHAT, {"messages": [user(RED)], **greedy()})
    assert status == 200
    assert tokenized and all(not name.startswith("owl2-model") for _, name in tokenized)


@pytest.mark.parametrize("name, body", [
    ("numbers", b'{"messages": [], "x": [' + b"1," * 200_000 + b"1]}"),
    ("objects", b'{"messages": [], "x": [' + b"{}," * 200_000 + b"{}]}"),
    ("strings", b'{"messages": [], "x": [' + b'"",' * 200_000 + b'""]}'),
    ("messages", json.dumps({"messages": [{"role": "user", "content": "a"}] * 50_000}).encode()),
    ("nested lists", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
])
def test_a_body_of_too_many_json_values_is_refused_before_it_is_parsed(tiny_server, monkeypatch,
                                                                        name, body):
    from owl2_edge.serve import limits as limits_module
    parsed = []
    real = limits_module.parse_json
    monkeypatch.setattr(limits_module, "parse_json", lambda b: parsed.append(len(b)) or real(b))
    status, reply_ = post(tiny_server.url, CHAT, body)
    assert status == 400 and reply_["error"]["code"] == "too_many_values", reply_
    assert not [n for n in parsed if n == len(body)]  # (the test's own client parses replies)
    props = get(tiny_server.url, "/props")[1]
    assert props["limits"]["max_json_values"] < body.count(b",") + body.count(b"[")


@pytest.mark.parametrize("body", [
    b'{"seed": 123456789012345678901234567890, "x": [-9223372036854775809, 18446744073709551616]}',
    b'{"a": 1, "a": 2, "b": [0.1, -0.0, 1E5, 1e400], "c": "\\u00e9\\ud83d\\ude00 \\ud800"}',
    '{"a": "é"}'.encode("utf-16"),
    b'{"grammar": "root ::= ' + b' | '.join(b'\\"w%d\\"' % i for i in range(20000)) + b'"}',
])
def test_bodies_are_read_as_pythons_json_reads_them(body):
    """parse_json takes orjson's speed only where it reads a body as Python's json does: an
    integer beyond 64 bits stays an integer (orjson would make it a float), a lone surrogate and
    another encoding are still read, and what is not JSON is refused with json's message."""
    from owl2_edge.serve.limits import parse_json
    assert repr(parse_json(body)) == repr(json.loads(body))


@pytest.mark.parametrize("body, message", [
    (b'{"a": NaN}', "NaN is not JSON"), (b'{"a": -Infinity}', "-Infinity is not JSON"),
    (b'{"a": 1', "Expecting"), (b'\xff', "can't decode"),
])
def test_what_is_not_json_is_refused_by_parse_json(body, message):
    from owl2_edge.serve.limits import parse_json
    with pytest.raises(ValueError, match=message):
        parse_json(body)


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_the_memory_of_refused_large_requests_comes_back(tiny_server):
    """The server runs in this process: its RSS is this process's, measured with the request
    bodies already built."""
    bodies = [json.dumps({"messages": [user(text="word " * 6_000_000)]}).encode(),
              json.dumps({"messages": [{"role": "user", "content": "w " * 10_000}] * 1400}
                         ).encode(),
              b'{"messages": [], "x": [' + b"1," * 15_000_000 + b"1]}"]
    assert all(len(b) < Limits().max_body_bytes for b in bodies)
    post(tiny_server.url, CHAT, ASK)
    gc.collect()
    before = rss_mb()
    for body in bodies * 2:
        status, _ = post(tiny_server.url, CHAT, body)
        assert status == 400
    # The trim runs after each response is sent: wait for it (bounded).
    deadline = time.monotonic() + 10
    while rss_mb() > before + 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rss_mb() <= before + 50, (before, rss_mb())
    status, _ = post(tiny_server.url, CHAT, ASK)
    assert status == 200


def test_prepare_is_generate_in_two_steps_and_refuses_what_cannot_fit(owl):
    prompt = "USER: <|image|>What is this? ASSISTANT:"
    params = SamplingParams(temperature=0, max_tokens=8)
    whole = "".join(owl.generate(prompt, [RED], params))
    prepared = owl.prepare(prompt, [RED])
    assert "".join(owl.generate(prepared, (), params)) == whole
    with pytest.raises(ArgumentError, match="prepared"):
        owl.generate(prepared, [RED], params)
    most = owl.max_prompt_chars(1)
    assert most == (owl.decoder.n_ctx - owl.manifest.n_visual) * owl.tokenizer.max_token_bytes
    owl.check_prompt_size("x" * most + "<|image|>", 1)  # marks are not text
    with pytest.raises(ContextFullError, match="cannot fit"):
        owl.check_prompt_size("x" * (most + 1), 1)
    with pytest.raises(ContextFullError, match="image"):
        owl.check_prompt_size("hi", owl.decoder.n_ctx // owl.manifest.n_visual + 1)
    with pytest.raises(ContextFullError):
        owl.prepare("y" * (owl.max_prompt_chars() + 1))
    assert "".join(owl.generate(prompt, [RED], params)) == whole  # still usable


# -- remote images --------------------------------------------------------------------------------

def image_request(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]}],
        **greedy()}


def test_every_refused_or_failed_download_gives_the_same_answer(start_server):
    """A refused address, a closed port, an open one that answers 404, one that answers too
    slowly and a name that does not resolve all read the same to the client."""
    png = RED
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with LoopbackServer(reply(200, png)) as good, LoopbackServer(reply(404)) as missing, \
            LoopbackServer(drip_body) as slow:
        names = {"router.test": ["192.168.1.1"], "metadata.test": ["169.254.169.254"],
                 "inside.test": ["::1"], "images.test": ["127.0.0.1"]}
        spy = ConnectSpy()
        limits = Limits(remote_timeout_s=1.0)
        fetcher = Fetcher(limits.max_image_bytes, limits.remote_timeout_s,
                          parse_networks(["127.0.0.1"]), resolve=stub_resolver(names),
                          connect=spy)
        with start_server(limits=limits, allow_remote_images=True, fetcher=fetcher) as s:
            status, answer = post(s.url, CHAT, image_request(f"http://images.test:{good.port}/a"))
            assert status == 200, answer
            messages = set()
            for url in ["http://router.test/x.png", "http://metadata.test/latest/meta-data",
                        "http://inside.test:8080/x.png", f"http://127.0.0.1:{closed_port}/x",
                        f"http://images.test:{missing.port}/x.png",
                        f"http://images.test:{slow.port}/x.png", "http://nowhere.test/x.png",
                        f"http://127.0.0.2:{good.port}/x.png"]:
                status, answer = post(s.url, CHAT, image_request(url))
                assert status == 400 and answer["error"]["code"] == "image_download_failed"
                messages.add(answer["error"]["message"])
            assert len(messages) == 1, messages
            assert {a for a, _ in spy.tried} == {"127.0.0.1"}


def test_a_nul_byte_or_an_empty_path_in_a_file_url_is_a_400(start_server, tmp_path):
    with start_server(allow_paths=[tmp_path]) as s:
        for url in [f"file://{tmp_path}/a\x00.png", f"file://{tmp_path}/a%00.png", "file://",
                    f"file://{tmp_path}/" + "x" * 5000, "file:///%ff%fe"]:
            status, answer = post(s.url, CHAT, image_request(url))
            assert 400 <= status < 500, (url, answer)
            assert_error_shape(answer, status)


# -- the request's time limit ---------------------------------------------------------------------

def test_an_answer_ends_at_the_request_time_limit(start_server, monkeypatch):
    limit = 1.0
    with start_server(limits=Limits(request_timeout_s=limit)) as s:
        slow_steps(monkeypatch, s.owl, 0.05)
        body = {"messages": [user()], **greedy(max_tokens=500)}
        start = time.monotonic()
        status, answer = post(s.url, CHAT, {**body, "ignore_eos": True})
        took = time.monotonic() - start
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
        assert 0 < answer["usage"]["completion_tokens"] < 500 and took < limit + 1.0
        chunks = list(client(s.url).chat.completions.create(
            stream=True, extra_body={"ignore_eos": True}, **body))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert metrics(s.url)["timeouts"] == 2


def test_a_request_waiting_past_its_time_limit_gets_503(start_server):
    with start_server(limits=Limits(request_timeout_s=1.0)) as s:
        with hold_slot(s.owl):  # the one slot stays busy past the request's limit
            start = time.monotonic()
            status, answer = post(s.url, CHAT, {"messages": [user()], **greedy()})
            took = time.monotonic() - start
        assert status == 503 and answer["error"]["code"] == "request_timeout", answer
        assert_error_shape(answer, 503)
        assert took < 1.0 + 1.0
        assert post(s.url, CHAT, {"messages": [user()], **greedy()})[0] == 200
        m = metrics(s.url)
        assert m["timeouts"] == 1 and m["queue"]["waiting"] == 0


def test_a_body_sent_too_slowly_gets_408(start_server):
    with start_server(limits=Limits(request_timeout_s=1.0)) as s:
        host, port = hosted(s.url).split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            start = time.monotonic()
            sock.settimeout(10)
            data = b""
            while time.monotonic() - start < 5:
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
                try:
                    sock.settimeout(0.2)
                    got = sock.recv(65536)
                    if not got:
                        break
                    data += got
                    if b"\r\n\r\n" in data:
                        break
                except socket.timeout:
                    pass
        assert data.startswith(b"HTTP/1.1 408"), data
        assert time.monotonic() - start < 1.0 + 1.5


# -- browsers -------------------------------------------------------------------------------------

def test_only_known_host_names_are_answered(tiny_server):
    url, port = tiny_server.url, hosted(tiny_server.url).split(":")[1]
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost.evil.com",
                 f"attacker.test:{port}", "xn--80ak6aa92e.com", "", "a b"]:
        status, _, body = raw(url, "GET", "/props", headers={"Host": host})
        assert status in (400, 403), (host, status)
        if status == 403:
            assert json.loads(body)["error"]["code"] == "host_not_allowed"
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 f"app.localhost:{port}", "LOCALHOST", f"192.168.1.5:{port}", "10.0.0.2",
                 "localhost."]:
        status, _, _ = raw(url, "GET", "/props", headers={"Host": host})
        assert status == 200, host


def test_host_allow_names_more_hosts_or_any(start_server):
    with start_server(host_allow=["owl.lan", "Box.Example"]) as s:
        assert raw(s.url, "GET", "/health", headers={"Host": "owl.lan:8080"})[0] == 200
        assert raw(s.url, "GET", "/health", headers={"Host": "box.example"})[0] == 200
        assert raw(s.url, "GET", "/health", headers={"Host": "other.lan"})[0] == 403
    with start_server(host_allow=["*"]) as s:
        assert raw(s.url, "GET", "/health", headers={"Host": "anything.example"})[0] == 200


def test_a_cross_origin_page_cannot_make_the_server_answer(tiny_server):
    url = tiny_server.url
    before = metrics(url)
    for origin, content_type in [("http://evil.example", "text/plain"),
                                 ("https://evil.example", "application/x-www-form-urlencoded"),
                                 ("null", "text/plain"),
                                 ("http://localhost:1", "text/plain"),
                                 (f"http://{hosted(url)}.evil.example", "application/json")]:
        status, headers, body = raw(url, "POST", CHAT, ASK, headers={
            "Host": hosted(url), "Origin": origin, "Content-Type": content_type})
        assert status == 403 and json.loads(body)["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers
        status, headers, _ = raw(url, "OPTIONS", CHAT, headers={
            "Host": hosted(url), "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert status == 403 and "access-control-allow-origin" not in headers
    assert metrics(url)["answers"] == before["answers"]
    # The chat page's own requests (same origin) are answered, without CORS headers.
    status, headers, body = raw(url, "POST", CHAT, ASK, headers={
        "Host": hosted(url), "Origin": url, "Content-Type": "application/json"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_cors_origin_lets_a_named_origin_call_the_api(start_server):
    app_origin = "https://app.example"
    with start_server(cors_origins=[app_origin], api_key="k") as s:
        status, headers, _ = raw(s.url, "OPTIONS", CHAT, headers={
            "Host": hosted(s.url), "Origin": app_origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204
        assert headers["access-control-allow-origin"] == app_origin
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, body = raw(s.url, "POST", CHAT, ASK, headers={
            "Host": hosted(s.url), "Origin": app_origin, "Content-Type": "application/json",
            "Authorization": "Bearer k"})
        assert status == 200 and headers["access-control-allow-origin"] == app_origin
        status, headers, _ = raw(s.url, "POST", CHAT, ASK, headers={
            "Host": hosted(s.url), "Origin": "https://other.example",
            "Content-Type": "application/json", "Authorization": "Bearer k"})
        assert status == 403


def test_props_tells_the_models_path_only_to_a_client_with_the_key(tiny_server, start_server):
    props = get(tiny_server.url, "/props")[1]
    assert "path" not in props["model"]
    assert str(tiny_server.owl.folder) not in json.dumps(props)
    limits = props["limits"]
    assert limits["max_prompt_chars"] == tiny_server.owl.max_prompt_chars()
    assert limits["request_timeout_s"] == Limits().request_timeout_s
    assert limits["remote_timeout_s"] == Limits().remote_timeout_s
    with start_server(api_key="k") as s:
        status, props = get(s.url, "/props", {"Authorization": "Bearer k"})
        assert status == 200 and props["model"]["path"] == str(s.owl.folder)


# -- no input is a 500 ----------------------------------------------------------------------------

def hostile_bodies() -> list:
    part = {"type": "image_url", "image_url": {"url": data_url(RED)}}
    values = [None, True, False, 0, -1, 1e308, -1e308, 2**64, -2**64, 0.5, "", "x" * 600, "\x00",
              "\ud800", [], [1], {}, {"a": 1}, [[[]]], "NaN", "1e999"]
    fields_ = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens",
               "seed", "stop", "repeat_penalty", "repeat_last_n", "ignore_eos", "n", "stream",
               "stream_options", "model", "messages", "prompt", "images", "user",
               "frequency_penalty", "presence_penalty", "logit_bias", "response_format",
               "json_schema", "grammar"]
    bodies = [{"messages": [user()], **greedy(), name: value}
              for name in fields_ for value in values]
    messages = [
        [{"role": "user", "content": [{"type": "image_url", "image_url": v}]} for v in values],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": v}}]}
         for v in values],
        [{"role": r, "content": "x"} for r in values if not isinstance(r, (list, dict))],
        [{"role": "user", "content": v} for v in values],
        [{"role": "user", "content": [{"type": v, "text": "x"}]} for v in values
         if not isinstance(v, (list, dict))],
        [{"role": "user", "content": [{"type": "text", "text": v}]} for v in values],
        [{"role": "user", "content": [part, {"type": "text", "text": "<|image|>" * 3}]}],
        [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}],
        [{"role": "user", "content": "x", "name": v} for v in values],
    ]
    for group in messages:
        bodies += [{"messages": [m], **greedy()} for m in group]
    for url in ["data:,", "data:image/png;base64", "data:image/png;base64,====",
                "data:;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode(),
                "file:", "file://host/etc/passwd", "http:", "https://", "http://[::1",
                "javascript:alert(1)", "\x00", "a" * 10000, "data:image/png;base64," + "A" * 99,
                base64.b64encode(b"GIF89a" + b"\xff" * 30).decode()]:
        bodies.append(image_request(url))
    bodies += [[], "text", 1, None, {"messages": []}, {"prompt": None}]
    return bodies


def test_no_request_is_a_500(start_server):
    """Every field given every wrong kind of value, broken images and messages, then random
    mutations of a good request: each is answered with its 2xx or 4xx, never a 500."""
    rng = random.Random(7)
    good = {"messages": [user(RED)], **greedy(max_tokens=3)}
    encoded = json.dumps(good).encode()
    with start_server() as s:
        statuses = {}
        for path in (CHAT, "/v1/completions"):
            for body in hostile_bodies():
                status, answer = _post_any(s.url, path, json.dumps(body).encode())
                assert status < 500, (path, body, answer)
                if status >= 400:
                    assert_error_shape(json.loads(answer), status)
                statuses[status] = statuses.get(status, 0) + 1
        for _ in range(150):
            mutated = bytearray(encoded)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(mutated))
                mutated[i] = rng.choice(b'{}[]",:0\\ \x00\xff' + bytes([rng.randrange(256)]))
            status, answer = _post_any(s.url, CHAT, bytes(mutated))
            assert status < 500, (bytes(mutated), answer)
        assert "500" not in metrics(s.url)["errors"]
        assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 10, statuses


def _post_any(url: str, path: str, data: bytes) -> tuple[int, object]:
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# -- usage in streams -----------------------------------------------------------------------------

def test_include_usage_sends_usage_in_an_extra_last_chunk_without_choices(tiny_server):
    api = client(tiny_server.url)
    chunks = list(api.chat.completions.create(messages=[user(RED)], stream=True,
                                              stream_options={"include_usage": True},
                                              **greedy()))
    *answer, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "timings" in last.model_extra
    assert all(c.usage is None for c in answer) and answer[-1].choices[0].finish_reason
    text = api.completions.create(prompt="USER: Hi ASSISTANT:", stream=True,
                                  stream_options={"include_usage": True}, **greedy())
    *parts, last = list(text)
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(p.usage is None for p in parts) and parts[-1].choices[0].finish_reason
    # Without it, usage rides on the finish chunk as before (llama-server's way).
    plain = list(api.chat.completions.create(messages=[user()], stream=True, **greedy()))
    assert plain[-1].choices[0].finish_reason and plain[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("body, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": True}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_bad_stream_options_are_refused(tiny_server, body, param):
    status, answer = post(tiny_server.url, CHAT, {"messages": [user()], **greedy(), **body})
    assert status == 400 and answer["error"]["param"] == param


# -- the command's new options --------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--allow-remote-images", "--allow-network", "10.0.0.0/33"],
     "error: --allow-network '10.0.0.0/33' is not an IP network"),
    (["--allow-network", "10.0.0.0/8"],
     "error: --allow-network only matters with --allow-remote-images"),
    (["--cors-origin", "app.example"], "error: --cors-origin 'app.example': an origin is"),
    (["--cors-origin", "https://app.example/path"], "error: --cors-origin"),
    (["--host-allow", "http://owl.lan"], "error: --host-allow 'http://owl.lan': a host name"),
    (["--request-timeout", "0"], "error: --request-timeout must be"),
])
def test_owl2_serve_refuses_bad_safety_options_in_one_line(tiny_model_dir, args, message):
    from test_serve import owl2
    proc = owl2("serve", "-m", tiny_model_dir, "--port", "0", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.startswith(message) and err.count("\n") == 1, err
