"""Tool calls through the grammar (owl2_edge/tool_calls.py), through the official openai client:
on the demo model, which was trained on its report_shape tool, a call asked for is the right
call and a plain question keeps its plain answer; on the tiny model, every tool_choice gives the
form it promises (a call whose arguments validate, or a reply), streamed as OpenAI streams it,
and an earlier call and its result go back into the prompt."""

from __future__ import annotations

import base64
import io
import json

import pytest

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")

from owl2_edge import scenes  # noqa: E402
from owl2_edge.prompt import TOOL_RESULT, Turn, render, tools_text  # noqa: E402
from owl2_edge.scenes import Scene, Thing  # noqa: E402

REPORT = {"type": "function", "function": scenes.REPORT_TOOL}
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1,
                                                             "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def _message(picture, text: str) -> dict:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tiny(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def demo(demo_server):
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def _call(reply):
    call = reply.choices[0].message.tool_calls[0]
    return call.function.name, json.loads(call.function.arguments)


def test_the_demo_model_calls_its_tool_when_asked_and_answers_plainly_otherwise(demo):
    scene = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)
    picture = scene.draw(224)
    reply = demo.chat.completions.create(
        model="demo", temperature=0, tools=[REPORT],
        messages=[_message(picture, "Report the blue shape.")])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.content is None
    assert _call(reply) == ("report_shape", {"color": "blue", "shape": "circle"})
    plain = demo.chat.completions.create(
        model="demo", temperature=0, tools=[REPORT],
        messages=[_message(picture, "How many shapes are there?")])
    assert plain.choices[0].message.content == "Two."
    assert not plain.choices[0].message.tool_calls and plain.choices[0].finish_reason == "stop"
    # Streamed: the call comes whole in one tool_calls delta, then finish_reason tool_calls.
    chunks = list(demo.chat.completions.create(
        model="demo", temperature=0, tools=[REPORT], stream=True,
        messages=[_message(picture, "Report the blue shape.")]))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls[0].function.name == "report_shape"
    assert json.loads(deltas[0].tool_calls[0].function.arguments) == \
        {"color": "blue", "shape": "circle"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function",
                                                      "function": {"name": "weather"}}])
def test_a_call_asked_for_is_a_call_whose_arguments_validate(tiny, tool_choice):
    for seed in range(4):
        reply = tiny.chat.completions.create(
            model="owl2", temperature=0.8, seed=seed, max_tokens=80, tools=[REPORT, WEATHER],
            tool_choice=tool_choice, messages=[{"role": "user", "content": "Go."}])
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue  # cut by max_tokens: a call's beginning is not a call
        assert choice.finish_reason == "tool_calls", choice
        name, arguments = _call(reply)
        function = {"report_shape": REPORT, "weather": WEATHER}[name]["function"]
        jsonschema.validate(arguments, function["parameters"])
        if isinstance(tool_choice, dict):
            assert name == "weather"
        assert choice.message.tool_calls[0].id.startswith("call_")


def test_auto_gives_a_call_or_a_reply_and_none_gives_a_reply(tiny, tiny_server):
    for seed in range(6):
        reply = tiny.chat.completions.create(
            model="owl2", temperature=0.8, seed=seed, max_tokens=60, tools=[WEATHER],
            messages=[{"role": "user", "content": "Weather?"}])
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            jsonschema.validate(_call(reply)[1], WEATHER["function"]["parameters"])
        else:
            assert not choice.message.content.startswith("{")
    # "none": the tools are shown, nothing is held: the answer is the same as without a grammar.
    owl = tiny_server.owl
    prompt = render([Turn("Weather?")], system=tools_text([WEATHER["function"]]))
    from owl2_edge.sampling import SamplingParams
    expected = "".join(owl.generate(prompt, [], SamplingParams(temperature=0, max_tokens=12)))
    reply = tiny.chat.completions.create(
        model="owl2", temperature=0, max_tokens=12, tools=[WEATHER], tool_choice="none",
        messages=[{"role": "user", "content": "Weather?"}])
    assert reply.choices[0].message.content == expected


def test_a_call_and_its_result_go_back_into_the_prompt(tiny, tiny_server):
    arguments = {"city": "Oslo", "days": 2}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": json.dumps(arguments)}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}]
    reply = tiny.chat.completions.create(model="owl2", temperature=0, max_tokens=8,
                                         tools=[WEATHER], tool_choice="none", messages=messages)
    prompt = render([Turn("Weather in Oslo?", json.dumps({"name": "weather",
                                                          "arguments": arguments})),
                     Turn(TOOL_RESULT + "Sunny.")], system=tools_text([WEATHER["function"]]))
    from owl2_edge.sampling import SamplingParams
    expected = "".join(tiny_server.owl.generate(prompt, [], SamplingParams(temperature=0,
                                                                           max_tokens=8)))
    assert reply.choices[0].message.content == expected


def test_parameters_with_their_own_definitions_compile_and_validate(tiny):
    """Pydantic writes nested models as $defs and $refs: in the call's schema they must still
    point at their targets, each function's own (two functions here name a def alike)."""
    def function(name: str, item: dict) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "$defs": {"Item": item},
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"},
                                     "minItems": 1, "maxItems": 2}},
            "required": ["items"], "additionalProperties": False}}}
    shape = function("shapes", {"type": "object", "properties": {"shape": {"enum": ["a", "b"]}},
                                "required": ["shape"], "additionalProperties": False})
    size = function("sizes", {"type": "integer", "minimum": 1, "maximum": 9})
    tools, checked = [shape, size], 0
    for seed, choice in enumerate(["required", {"type": "function",
                                                "function": {"name": "sizes"}}] * 2):
        reply = tiny.chat.completions.create(
            model="owl2", temperature=0.8, seed=seed, max_tokens=80, tools=tools,
            tool_choice=choice, messages=[{"role": "user", "content": "Go."}])
        if reply.choices[0].finish_reason == "length":
            continue
        name, arguments = _call(reply)
        schema = {"shapes": shape, "sizes": size}[name]["function"]["parameters"]
        jsonschema.validate(arguments, schema)
        assert choice == "required" or name == "sizes"
        checked += 1
    assert checked >= 2


def test_the_python_api_calls_tools_as_the_server_does(demo_server):
    """Owl2.create_chat_completion(tools=...): the same call as the route, streamed whole."""
    owl = demo_server.owl
    scene = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)
    messages = [_message(scene.draw(224), "Report the blue shape.")]
    reply = owl.create_chat_completion(messages, tools=[REPORT], temperature=0)
    [call] = reply["choices"][0]["message"]["tool_calls"]
    assert reply["choices"][0]["finish_reason"] == "tool_calls"
    assert reply["choices"][0]["message"]["content"] is None
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == \
        ("report_shape", {"color": "blue", "shape": "circle"})
    chunks = list(owl.create_chat_completion(messages, tools=[REPORT], temperature=0,
                                             stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert [d for d in deltas if "content" in d] == []
    [streamed] = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert json.loads(streamed["function"]["arguments"]) == {"color": "blue", "shape": "circle"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # tool_choice "none" shows the tool and answers plainly; a bad tool_choice is named.
    plain = owl.create_chat_completion([_message(scene.draw(224), "How many shapes are there?")],
                                       tools=[REPORT], tool_choice="none", temperature=0)
    assert plain["choices"][0]["message"]["content"] == "Two."
    from owl2_edge.errors import ArgumentError
    with pytest.raises(ArgumentError, match="tool_choice"):
        owl.create_chat_completion(messages, tools=[REPORT], tool_choice={"type": "function",
                                                                          "function": {"name": "x"}})
    assert owl.ask(scene.draw(224), "What color is the square?", temperature=0) == "Red."
