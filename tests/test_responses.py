"""OpenAI's Responses API (/v1/responses, owl2_edge/serve/responses.py) through the official
openai client: the demo model's right answers (a colour, its scene as JSON under a parsed schema,
its tool called with the right arguments), the same answer as /v1/chat/completions for the same
request, the typed events the SDK's stream helper checks, and each field it cannot act on
refused by name. Hostile bodies are never a 5xx."""

from __future__ import annotations

import base64
import io
import json
import random
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
pydantic = pytest.importorskip("pydantic")

from owl2_edge import scenes  # noqa: E402
from owl2_edge.scenes import Scene, Thing  # noqa: E402

REPORT = {"type": "function", **scenes.REPORT_TOOL}
SCENE = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)


def _url(picture) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _asked(text: str, picture=None) -> list[dict]:
    parts = [{"type": "input_image", "image_url": _url(picture)}] if picture is not None else []
    return [{"role": "user", "content": [*parts, {"type": "input_text", "text": text}]}]


def _chat_asked(text: str, picture=None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": _url(picture)}}] \
        if picture is not None else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def demo(demo_server):
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def test_a_response_answers_as_chat_completions_does(demo):
    picture = SCENE.draw(224)
    reply = demo.responses.create(model="demo", temperature=0,
                                  input=_asked("What color is the square?", picture))
    chat = demo.chat.completions.create(model="demo", temperature=0,
                                        messages=_chat_asked("What color is the square?", picture))
    assert reply.output_text == chat.choices[0].message.content == "Red."
    assert reply.status == "completed" and reply.incomplete_details is None
    assert reply.id.startswith("resp_") and reply.object == "response"
    [item] = reply.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    # The same prompt asked again: its positions come from the cache.
    assert reply.usage.input_tokens_details.cached_tokens < reply.usage.input_tokens


def test_a_streamed_response_is_the_typed_events_the_sdk_checks(demo):
    picture = SCENE.draw(224)
    with demo.responses.stream(model="demo", temperature=0,
                               input=_asked("How many shapes are there?", picture)) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Two."
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_instructions_are_the_chat_routes_system_message(tiny):
    reply = tiny.responses.create(model="owl2", temperature=0, max_output_tokens=10,
                                  instructions="Answer briefly.", input="Hello there")
    chat = tiny.chat.completions.create(
        model="owl2", temperature=0, max_tokens=10,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Hello there"}])
    assert reply.output_text == chat.choices[0].message.content
    developer = tiny.responses.create(
        model="owl2", temperature=0, max_output_tokens=10,
        input=[{"role": "developer", "content": "Answer briefly."},
               {"role": "user", "content": "Hello there"}])
    assert developer.output_text == reply.output_text


def test_a_parsed_schema_gets_the_demo_scene(demo):
    class Shape(pydantic.BaseModel):
        place: str
        shape: str
        color: str

    class SceneJSON(pydantic.BaseModel):
        count: int
        shapes: list[Shape]

    picture = SCENE.draw(224)
    reply = demo.responses.parse(model="demo", temperature=0, text_format=SceneJSON,
                                 input=_asked(scenes.JSON_QUESTION, picture))
    assert reply.output_parsed == SceneJSON.model_validate_json(scenes.scene_json(SCENE))


def test_the_demo_calls_its_tool_through_responses(demo):
    picture = SCENE.draw(224)
    reply = demo.responses.create(model="demo", temperature=0, tools=[REPORT],
                                  input=_asked("Report the blue shape.", picture))
    [call] = reply.output
    assert call.type == "function_call" and call.name == "report_shape"
    assert json.loads(call.arguments) == {"color": "blue", "shape": "circle"}
    assert call.call_id.startswith("call_") and reply.status == "completed"
    plain = demo.responses.create(model="demo", temperature=0, tools=[REPORT],
                                  input=_asked("How many shapes are there?", picture))
    assert plain.output_text == "Two." and plain.output[0].type == "message"
    # Streamed through the SDK's helper: one function_call item, its arguments whole.
    with demo.responses.stream(model="demo", temperature=0, tools=[REPORT],
                               input=_asked("Report the blue shape.", picture)) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert not any(e.type == "response.output_text.delta" for e in events)
    [streamed] = final.output
    assert streamed.type == "function_call"
    assert json.loads(streamed.arguments) == {"color": "blue", "shape": "circle"}


def test_a_call_and_its_output_go_back_as_on_chat(tiny):
    weather = {"type": "function", "name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}}
    reply = tiny.responses.create(
        model="owl2", temperature=0, max_output_tokens=8, tools=[weather],
        input=[{"role": "user", "content": "Weather in Oslo?"},
               {"type": "function_call", "call_id": "call_1", "name": "weather",
                "arguments": json.dumps({"city": "Oslo"})},
               {"type": "function_call_output", "call_id": "call_1", "output": "Sunny."}],
        tool_choice="none")
    chat = tiny.chat.completions.create(
        model="owl2", temperature=0, max_tokens=8, tool_choice="none",
        tools=[{"type": "function", "function": {k: v for k, v in weather.items()
                                                 if k != "type"}}],
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": None, "tool_calls": [{
                      "id": "call_1", "type": "function",
                      "function": {"name": "weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}])
    assert reply.output_text == chat.choices[0].message.content


def test_max_output_tokens_makes_an_incomplete_response(tiny):
    reply = tiny.responses.create(model="owl2", temperature=0, max_output_tokens=2,
                                  input="Tell me a story.", extra_body={"ignore_eos": True})
    assert reply.status == "incomplete"
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 2
    events = list(tiny.responses.create(model="owl2", temperature=0, max_output_tokens=2,
                                        input="Tell me a story.", stream=True,
                                        extra_body={"ignore_eos": True}))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].content[0].text == reply.output_text


def _post(url: str, body, path: str = "/v1/responses") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else {"events": text}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("field, value, param", [
    ("store", True, "store"), ("previous_response_id", "resp_1", "previous_response_id"),
    ("conversation", "conv_1", "conversation"), ("background", True, "background"),
    ("include", ["reasoning.encrypted_content"], "include"), ("top_logprobs", 3, "top_logprobs"),
    ("reasoning", {"effort": "high"}, "reasoning"), ("truncation", "auto", "truncation"),
    ("tools", [{"type": "web_search"}], "tools"), ("temprature", 0, "temprature"),
    ("max_output_tokens", -1, "max_output_tokens"),
    ("text", {"format": {"type": "json_schema", "name": "x", "schema": []}}, "text.format.schema"),
    ("text", {"format": {"type": "xml"}}, "text.format.type"),
    ("text", {"verbosity": "high"}, "text.verbosity"),
    ("tool_choice", "required", "tool_choice"),
])
def test_what_this_server_cannot_act_on_is_refused_by_name(tiny_server, field, value, param):
    status, answer = _post(tiny_server.url, {"model": "owl2", "input": "Hi", field: value})
    assert status == 400, answer
    assert answer["error"]["param"] == param, answer


@pytest.mark.parametrize("item", [
    {"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]},
    {"role": "user", "content": [{"type": "input_image", "image_url": "data:,", "detail": "high"}]},
    {"role": "user", "content": [{"type": "input_file", "file_data": "x"}]},
    {"type": "reasoning", "summary": []},
])
def test_input_it_cannot_read_is_refused(tiny_server, item):
    status, answer = _post(tiny_server.url, {"model": "owl2", "input": [item]})
    assert status == 400 and answer["error"]["param"] == "input", answer


def test_the_plain_aliases_answer_too(tiny_server):
    body = {"model": "owl2", "input": "Hi", "max_output_tokens": 3, "temperature": 0}
    status, plain = _post(tiny_server.url, body, "/responses")
    status_v1, v1 = _post(tiny_server.url, body)
    assert status == status_v1 == 200
    assert plain["output"][0]["content"][0]["text"] == v1["output"][0]["content"][0]["text"]


def test_no_hostile_body_is_a_5xx(tiny_server):
    values = [None, True, False, 0, -1, 1e308, 2**64, 0.5, "", "x" * 600, "\x00", "\ud800", [],
              [1], {}, {"a": 1}, [[[]]], "NaN"]
    image = _url(SCENE.draw(64))
    good = {"model": "owl2", "max_output_tokens": 2, "temperature": 0,
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": image},
                                                    {"type": "input_text", "text": "Hi"}]}]}
    bodies = [{**good, name: v} for name in
              ("model", "input", "instructions", "stream", "text", "tools", "tool_choice",
               "temperature", "top_p", "max_output_tokens", "store", "metadata", "include",
               "parallel_tool_calls", "user", "reasoning", "truncation", "seed", "top_k")
              for v in values]
    bodies += [{**good, "input": [v]} for v in values]
    bodies += [{**good, "input": [{"role": "user", "content": [v]}]} for v in values]
    bodies += [{**good, "input": [{"role": v, "content": "x"}]} for v in values
               if not isinstance(v, (list, dict))]
    bodies += [{**good, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": v}]}]} for v in values]
    bodies += [{**good, "text": {"format": v}} for v in values]
    bodies += [{**good, "tools": [v]} for v in values]
    bodies += [{**good, "input": [{"type": "function_call", "call_id": "c", "name": v,
                                   "arguments": v}, {"role": "user", "content": "x"}]}
               for v in values]
    statuses = {}
    for body in bodies:
        status, answer = _post(tiny_server.url, body)
        assert status < 500, (body, answer)
        if status >= 400:
            assert set(answer) == {"error"} and answer["error"]["message"], answer
        statuses[status] = statuses.get(status, 0) + 1
    rng, encoded = random.Random(5), json.dumps(good).encode()
    for _ in range(100):
        mutated = bytearray(encoded)
        for _ in range(rng.randint(1, 6)):
            mutated[rng.randrange(len(mutated))] = rng.choice(b'{}[]",:0\\ \x00\xff')
        status, answer = _post(tiny_server.url, bytes(mutated))
        assert status < 500, (bytes(mutated), answer)
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 10, statuses
    assert tiny_server.owl.engine.n_running == 0


def test_the_snippet_in_docs_clients_runs(demo_server, capsys):
    """docs/clients.md's Responses snippet, as written, against the demo model."""
    import re
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "clients.md").read_text(encoding="utf-8")
    snippet = re.search(r"## OpenAI's Responses API\n\n```python\n(.*?)```", text, re.S).group(1)
    snippet = snippet.replace("http://127.0.0.1:8080", demo_server.url)
    snippet = snippet.replace("data:image/png;base64,...", _url(SCENE.draw(224)))
    exec(compile(snippet, "docs/clients.md", "exec"), {})
    assert capsys.readouterr().out == "Red.\n"
