"""ollama's API (owl2_edge/serve/ollama.py) through ollama's own Python client on the tiny model:
chat with an image, streamed and not, equal to the Python API's answer to the same question;
generate with a JSON schema as `format`; list, show, ps, version; a model load request; and
every option or field this server cannot act on refused with a 400 naming it, in ollama's error
shape (the client raises ResponseError with the message)."""

from __future__ import annotations

import json
import urllib.request

import base64
import random
import urllib.error

import numpy as np
import pytest

from owl2_edge.sampling import SamplingParams

ollama = pytest.importorskip("ollama", reason="needs ollama's client (the dev extra)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image
    path = tmp_path_factory.mktemp("ollama") / "photo.png"
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def client(tiny_server):
    return ollama.Client(host=tiny_server.url, timeout=60)


def test_chat_with_an_image_is_the_api_s_answer_streamed_and_not(client, tiny_server, photo):
    owl = tiny_server.owl
    expected = owl.ask(photo, QUESTION, temperature=0, max_tokens=8)
    tokens = owl.stats.generated_tokens
    messages = [{"role": "user", "content": QUESTION, "images": [str(photo)]}]
    options = {"temperature": 0, "num_predict": 8}
    reply = client.chat(model="owl2", messages=messages, options=options, keep_alive="5m")
    assert reply.message.role == "assistant" and reply.message.content == expected
    assert reply.done and reply.done_reason in ("stop", "length") and reply.eval_count == tokens
    assert reply.done_reason == ("length" if tokens == 8 else "stop")
    assert reply.prompt_eval_count > owl.manifest.n_visual and reply.total_duration > 0
    parts = list(client.chat(model="owl2", messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == tokens and parts[-1].message.content == ""


def test_a_conversation_and_a_system_message_take_the_template(client, tiny_server):
    from owl2_edge.prompt import Turn, render
    owl = tiny_server.owl
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Hello."},
               {"role": "assistant", "content": "Hi."},
               {"role": "user", "content": "Name a colour."}]
    prompt = render([Turn("Hello.", "Hi."), Turn("Name a colour.")], system="Be brief.")
    expected = "".join(owl.generate(prompt, [], SamplingParams(temperature=0, max_tokens=6)))
    reply = client.chat(model="owl2", messages=history, options={"temperature": 0,
                                                                 "num_predict": 6})
    assert reply.message.content == expected


def test_generate_follows_a_json_schema_given_as_format(client, photo):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0,
                                                         "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}
    reply = client.generate(model="owl2", prompt="Describe it as JSON.", images=[str(photo)],
                            format=schema, options={"temperature": 0, "num_predict": 60})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.response), schema)
    free = client.generate(model="owl2", prompt="Say something.", format="json",
                           options={"temperature": 0, "num_predict": 60}, stream=True)
    parts = list(free)
    if parts[-1].done_reason == "stop":
        assert isinstance(json.loads("".join(p.response for p in parts)), dict)


def test_raw_generate_takes_the_prompt_as_it_is(client, tiny_server):
    owl = tiny_server.owl
    raw = "USER: Count to three. ASSISTANT:"
    expected = owl.ask([], raw, raw=True, temperature=0, max_tokens=5)
    reply = client.generate(model="owl2", prompt=raw, raw=True,
                            options={"temperature": 0, "num_predict": 5})
    assert reply.response == expected


def test_the_model_is_listed_shown_and_loaded(client, tiny_server):
    name = tiny_server.owl.folder.name
    listed = client.list().models
    assert [m.model for m in listed] == [name]
    assert listed[0].size > 0 and listed[0].details.family == "llama"
    shown = client.show(name)
    assert set(shown.capabilities) == {"completion", "vision", "tools"}
    assert shown.modelinfo["llama.block_count"] == tiny_server.owl.manifest.decoder.n_layer
    running = client.ps().models
    assert [m.model for m in running] == [name] and running[0].context_length > 0
    with urllib.request.urlopen(tiny_server.url + "/api/version", timeout=30) as r:
        assert json.loads(r.read())["version"]
    # A request with nothing to answer loads the model, as ollama's.
    loaded = client.generate(model=name, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert client.chat(model=name, messages=[]).done_reason == "load"


@pytest.mark.parametrize("call, words", [
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}],
                      options={"mirostat": 2}), "options.mirostat is not supported"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}],
                      options={"num_ctx": 10**6}), "options.num_ctx 1000000"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}],
                      options={"temperature": -1}), "options.temperature"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}], format="json",
                      tools=[{"type": "function", "function": {"name": "f", "parameters": {
                          "type": "object", "properties": {}}}}]),
     "tools cannot be combined with format"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}],
                      tools=[{"type": "function", "function": {"name": "f g"}}]),
     "tools[0].function.name"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}], think=True),
     "think is not supported"),
    (lambda c: c.chat(model="owl2", messages=[{"role": "user", "content": "Hi"}],
                      format={"type": "objekt"}), "format cannot be compiled"),
    (lambda c: c.generate(model="owl2", prompt="Hi", suffix="end"), "suffix is not supported"),
    (lambda c: c.generate(model="owl2", prompt="<|image|> Hi", raw=True),
     "image"),
])
def test_what_this_server_cannot_act_on_is_refused_by_name(client, call, words):
    with pytest.raises(ollama.ResponseError) as e:
        call(client)
    assert e.value.status_code == 400 and words in e.value.error, e.value.error


def test_errors_come_in_ollama_s_shape_and_a_stream_s_error_is_its_last_line(tiny_server):
    request = urllib.request.Request(tiny_server.url + "/api/chat", json.dumps(
        {"model": "owl2", "messages": [{"role": "user", "content": "Hi"}],
         "bogus": 1}).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read()) == {
        "error": "unknown field 'bogus': this server does not act on it"}


def _post(url: str, path: str, data: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_no_ollama_request_is_a_500(tiny_server, photo):
    """Every field and option given every wrong kind of value, broken messages and images, then
    random mutations of a good body: each a 2xx or a 4xx in ollama's shape, never a 5xx."""
    values = [None, True, False, 0, -1, 1e308, 2**64, 0.5, "", "x" * 600, "\x00", "\ud800", [],
              [1], {}, {"a": 1}, [[[]]], "NaN"]
    image = base64.b64encode(photo.read_bytes()).decode()
    chat = {"model": "owl2", "messages": [{"role": "user", "content": "Hi", "images": [image]}],
            "stream": False, "options": {"num_predict": 2, "temperature": 0}}
    generate = {"model": "owl2", "prompt": "Hi", "images": [image], "stream": False,
                "options": {"num_predict": 2, "temperature": 0}}
    bodies = []
    for path, good, names_ in (
            ("/api/chat", chat, ["model", "messages", "stream", "format", "options",
                                 "keep_alive", "tools", "think", "logprobs", "top_logprobs"]),
            ("/api/generate", generate, ["model", "prompt", "images", "system", "raw",
                                         "template", "context", "suffix", "format", "stream"])):
        bodies += [(path, {**good, name: v}) for name in names_ for v in values]
        bodies += [(path, {**good, "options": {"num_predict": 2, option: v}})
                   for option in ("temperature", "top_k", "top_p", "seed", "stop", "num_ctx",
                                  "repeat_penalty", "mirostat", "num_thread") for v in values]
    bodies += [("/api/chat", {**chat, "messages": [m]}) for m in
               [{"role": v, "content": "x"} for v in values if not isinstance(v, (list, dict))] +
               [{"role": "user", "content": v} for v in values] +
               [{"role": "user", "content": "x", "images": [v]} for v in values] +
               [{"role": "user", "content": "x", "images": v} for v in values]]
    bodies += [("/api/show", {"model": v}) for v in values]
    rng, statuses = random.Random(3), {}
    for path, body in bodies:
        status, answer = _post(tiny_server.url, path, json.dumps(body).encode())
        assert status < 500, (path, body, answer)
        if status >= 400:
            assert set(json.loads(answer)) == {"error"}, answer
        statuses[status] = statuses.get(status, 0) + 1
    encoded = json.dumps(chat).encode()
    for _ in range(100):
        mutated = bytearray(encoded)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.choice(b'{}[]",:0\\ \x00\xff')
        status, answer = _post(tiny_server.url, "/api/chat", bytes(mutated))
        assert status < 500, (bytes(mutated), answer)
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 10, statuses
    assert tiny_server.owl.engine.n_running == 0


def test_the_snippet_in_docs_clients_runs(tiny_server, photo, capsys):
    """docs/clients.md's ollama snippet, as written, against this server."""
    import re
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "clients.md").read_text(encoding="utf-8")
    snippet = re.search(r"## ollama's client\n\n```python\n(.*?)```", text, re.S).group(1)
    snippet = snippet.replace("http://127.0.0.1:8080", tiny_server.url)
    snippet = snippet.replace('"photo.png"', repr(str(photo)))
    exec(compile(snippet, "docs/clients.md", "exec"), {})
    out = capsys.readouterr().out
    last = out.splitlines()[-1]
    assert last.endswith("['completion', 'vision', 'tools']") and tiny_server.owl.folder.name in last
    assert re.search(r" (stop|length) \d+\n", out), out


def test_the_demo_calls_its_tool_through_ollamas_client(demo_server, tmp_path):
    """tools on /api/chat: the demo's right call, whole in one streamed line too; a plain
    question keeps its plain answer."""
    from owl2_edge import scenes
    from owl2_edge.scenes import Scene, Thing
    scene = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)
    picture = tmp_path / "scene.png"
    scene.draw(224).save(picture)
    demo = ollama.Client(host=demo_server.url, timeout=60)
    tools = [{"type": "function", "function": scenes.REPORT_TOOL}]
    asked = [{"role": "user", "content": "Report the blue shape.", "images": [str(picture)]}]
    reply = demo.chat(model="demo", messages=asked, tools=tools, options={"temperature": 0})
    [call] = reply.message.tool_calls
    assert call.function.name == "report_shape"
    assert dict(call.function.arguments) == {"color": "blue", "shape": "circle"}
    assert reply.message.content == "" and reply.done_reason == "stop"
    parts = list(demo.chat(model="demo", messages=asked, tools=tools, stream=True,
                           options={"temperature": 0}))
    calls = [p.message.tool_calls for p in parts if p.message.tool_calls]
    assert len(calls) == 1 and dict(calls[0][0].function.arguments) == \
        {"color": "blue", "shape": "circle"}
    assert "".join(p.message.content for p in parts) == ""
    plain = demo.chat(model="demo", tools=tools, options={"temperature": 0}, messages=[
        {"role": "user", "content": "How many shapes are there?", "images": [str(picture)]}])
    assert plain.message.content == "Two." and not plain.message.tool_calls


def test_a_call_and_the_tools_answer_go_back_as_on_the_openai_route(client, tiny_server):
    # As ollama's client writes a tool (its Tool model keeps these keys, in this order).
    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
    ours = client.chat(model="owl2", tools=[weather], options={"temperature": 0,
                                                               "num_predict": 8}, messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "Sunny.", "tool_name": "weather"}])
    request = urllib.request.Request(tiny_server.url + "/v1/chat/completions", json.dumps({
        "model": "owl2", "temperature": 0, "max_tokens": 8, "tools": [weather],
        "messages": [{"role": "user", "content": "Weather in Oslo?"},
                     {"role": "assistant", "content": None, "tool_calls": [{
                         "id": "call_1", "type": "function", "function": {
                             "name": "weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}]}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        theirs = json.load(r)["choices"][0]["message"]
    if theirs.get("tool_calls"):
        function = theirs["tool_calls"][0]["function"]
        assert ours.message.tool_calls[0].function.name == function["name"]
        assert dict(ours.message.tool_calls[0].function.arguments) == \
            json.loads(function["arguments"])
    else:
        assert ours.message.content == theirs["content"]
