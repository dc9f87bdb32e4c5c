"""The client libraries apps are built on, as their users call them, against `owl2 serve` on the
demo model (loopback): langchain-openai, instructor and pydantic-ai (the openai and ollama
clients have their own modules). Where the demo model can know the answer, the answer must be
right, not only well formed: the colour of the square, the scene as JSON, its report_shape tool
called for the blue shape (docs/clients.md, "What each library sends").

Where a library writes its own instructions into the prompt (instructor's JSON and MD_JSON
modes, pydantic-ai's PromptedOutput), the demo model, trained on short questions, does not
follow them; there the test checks that the request the library sends is answered as the Python
API answers the same messages, i.e. that nothing it sent was dropped on the way."""

from __future__ import annotations

import base64
import copy
import io
import json

import pytest

pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
pydantic = pytest.importorskip("pydantic")

from owl2_edge import scenes  # noqa: E402
from owl2_edge.scenes import Scene, Thing  # noqa: E402

SCENE = Scene((Thing("square", "red", "left"), Thing("circle", "blue", "right")), seed=3)
QUESTIONS = {"What color is the square?": "Red.", "What color is the circle?": "Blue.",
             "How many shapes are there?": "Two.", "What shape is on the left?": "A square."}
RIGHT_CALL = {"color": "blue", "shape": "circle"}


class Shape(pydantic.BaseModel):
    place: str
    shape: str
    color: str


class SceneJSON(pydantic.BaseModel):
    count: int
    shapes: list[Shape]


class report_shape(pydantic.BaseModel):  # noqa: N801 - the tool's name, as the demo knows it
    """Report one shape of the picture."""
    color: str
    shape: str


EXPECTED_SCENE = SceneJSON.model_validate_json(scenes.scene_json(SCENE))


def _png() -> bytes:
    buf = io.BytesIO()
    SCENE.draw(224).save(buf, format="PNG")
    return buf.getvalue()


def _url() -> str:
    return "data:image/png;base64," + base64.b64encode(_png()).decode()


def _asked(text: str) -> list[dict]:
    """OpenAI chat messages: the picture, then the question (the demo's order)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url()}},
                                         {"type": "text", "text": text}]}]


# -- langchain-openai -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(demo_server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=demo_server.url + "/v1", api_key="none",
                                       model="demo", temperature=0, max_retries=0, timeout=60)


def _human(text: str):
    from langchain_core.messages import HumanMessage
    return [HumanMessage(content=_asked(text)[0]["content"])]


def test_langchain_invokes_streams_and_batches(chat_model):
    assert chat_model.invoke(_human("What color is the square?")).content == "Red."
    streamed = list(chat_model.stream(_human("What color is the square?")))
    assert len(streamed) > 1 and "".join(c.content for c in streamed) == "Red."
    answers = chat_model.batch([_human(q) for q in QUESTIONS])
    assert [a.content for a in answers] == list(QUESTIONS.values())


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_structured_output_gets_the_scene(chat_model, method):
    structured = chat_model.with_structured_output(SceneJSON, method=method)
    assert structured.invoke(_human(scenes.JSON_QUESTION)) == EXPECTED_SCENE


def test_langchain_function_calling_calls_the_demo_tool(chat_model):
    structured = chat_model.with_structured_output(scenes.REPORT_TOOL, method="function_calling")
    assert structured.invoke(_human("Report the blue shape.")) == RIGHT_CALL


# -- instructor -----------------------------------------------------------------------------------

def _instructor(demo_server, mode_name: str):
    instructor = pytest.importorskip("instructor")
    import openai
    client = openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none", max_retries=0,
                           timeout=60)
    return instructor.from_openai(client, mode=getattr(instructor.Mode, mode_name))


def test_instructor_tools_calls_the_demo_tool(demo_server):
    client = _instructor(demo_server, "TOOLS")
    call = client.chat.completions.create(model="demo", temperature=0, max_retries=0,
                                          response_model=report_shape,
                                          messages=_asked("Report the blue shape."))
    assert call.model_dump() == RIGHT_CALL
    # A model with nested models ($defs and $ref in its parameters) compiles and validates.
    scene = client.chat.completions.create(model="demo", temperature=0, max_retries=0,
                                           response_model=SceneJSON,
                                           messages=_asked(scenes.JSON_QUESTION))
    assert isinstance(scene, SceneJSON) and scene.count >= 1


def test_instructor_json_schema_gets_the_scene(demo_server):
    client = _instructor(demo_server, "JSON_SCHEMA")
    scene = client.chat.completions.create(model="demo", temperature=0, max_retries=0,
                                           response_model=SceneJSON,
                                           messages=_asked(scenes.JSON_QUESTION))
    assert scene.model_dump() == EXPECTED_SCENE.model_dump()  # (instructor's own subclass)


@pytest.mark.parametrize("mode_name", ["JSON", "MD_JSON"])
def test_instructor_prompted_modes_are_answered_as_the_api_answers(demo_server, mode_name):
    """instructor's own instructions in the prompt: the demo does not follow them, so the
    answer is checked against the Python API's for the very request instructor sent."""
    client = _instructor(demo_server, mode_name)
    sent, received = [], []
    client.on("completion:kwargs", lambda *args, **kwargs: sent.append(copy.deepcopy(kwargs)))
    client.on("completion:response", lambda response: received.append(response))
    from instructor.core.exceptions import InstructorError
    try:
        client.chat.completions.create(model="demo", temperature=0, max_retries=0,
                                       max_tokens=48, response_model=SceneJSON,
                                       messages=_asked(scenes.JSON_QUESTION))
    except InstructorError:  # the demo's answer does not validate; what it was is checked below
        pass
    assert len(sent) == len(received) == 1
    kwargs = {k: v for k, v in sent[0].items() if k != "model"}
    expected = demo_server.owl.create_chat_completion(**kwargs)
    assert received[0].choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert received[0].choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    if mode_name == "JSON" and expected["choices"][0]["finish_reason"] == "stop":
        json.loads(received[0].choices[0].message.content)  # json_object: JSON by the grammar


# -- pydantic-ai ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pai_model(demo_server):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    return OpenAIChatModel("demo", provider=OpenAIProvider(base_url=demo_server.url + "/v1",
                                                           api_key="none"))


def _run(model, output_type, question: str):
    from pydantic_ai import Agent, BinaryContent
    agent = Agent(model, output_type=output_type, model_settings={"temperature": 0}, retries=0)
    return agent.run_sync([BinaryContent(data=_png(), media_type="image/png"), question]).output


def test_pydantic_ai_text_output_with_a_picture(pai_model):
    assert _run(pai_model, str, "What color is the square?") == "Red."


def test_pydantic_ai_tool_output_calls_the_demo_tool(pai_model):
    from pydantic_ai import ToolOutput
    output = ToolOutput(report_shape, name="report_shape",
                        description="Report one shape of the picture.")
    assert _run(pai_model, output, "Report the blue shape.").model_dump() == RIGHT_CALL


def test_pydantic_ai_native_output_gets_the_scene(pai_model):
    from pydantic_ai import NativeOutput
    assert _run(pai_model, NativeOutput(SceneJSON), scenes.JSON_QUESTION) == EXPECTED_SCENE


def test_pydantic_ai_prompted_output_is_answered_as_the_api_answers(demo_server):
    """PromptedOutput writes its schema into a system message the demo does not follow: the
    request pydantic-ai sends is checked against the Python API's answer to the same."""
    pytest.importorskip("pydantic_ai")
    import openai
    from pydantic_ai import Agent, BinaryContent, PromptedOutput
    from pydantic_ai.exceptions import UnexpectedModelBehavior
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    captured = []

    async def record(response):  # the openai client's own HTTP client, with a response hook
        await response.aread()
        captured.append((json.loads(response.request.content), response.json()))

    http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [record]})
    client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="none",
                                max_retries=0, http_client=http)
    model = OpenAIChatModel("demo", provider=OpenAIProvider(openai_client=client))
    agent = Agent(model, output_type=PromptedOutput(SceneJSON),
                  model_settings={"temperature": 0, "max_tokens": 48}, retries=0)
    try:
        agent.run_sync([BinaryContent(data=_png(), media_type="image/png"),
                        scenes.JSON_QUESTION])
    except UnexpectedModelBehavior:  # the demo's answer does not validate
        pass
    [(request, response)] = captured
    assert request["response_format"] == {"type": "json_object"}
    asked = {k: v for k, v in request.items() if k not in ("model", "stream")}
    asked["max_tokens"] = asked.pop("max_completion_tokens")  # the API's name for it
    expected = demo_server.owl.create_chat_completion(**asked)
    assert response["choices"][0]["message"]["content"] == \
        expected["choices"][0]["message"]["content"]


@pytest.mark.parametrize("opening, expected", [
    ("from langchain_core", "Red.\n"), ("import instructor", "blue circle\n"),
    ("from pydantic import BaseModel\nfrom pydantic_ai", "2\n")])
def test_the_snippets_in_docs_clients_run(demo_server, tmp_path, opening, expected):
    """docs/clients.md's snippets for these libraries, as written, run as a script against the
    demo model."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("langchain_openai")
    pytest.importorskip("instructor")
    pytest.importorskip("pydantic_ai")
    text = (Path(__file__).parent.parent / "docs" / "clients.md").read_text(encoding="utf-8")
    [snippet] = [s for s in re.findall(r"```python\n(.*?)```", text, re.S)
                 if s.startswith(opening)]
    photo = tmp_path / "photo.png"
    photo.write_bytes(_png())
    snippet = snippet.replace("http://127.0.0.1:8080", demo_server.url)
    snippet = snippet.replace("data:image/png;base64,...", _url())
    snippet = snippet.replace('"photo.png"', repr(str(photo)))
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
