"""Structured output (owl2_edge/constrain.py, docs/structured.md): answers that follow a JSON
schema, any JSON object, or a GBNF / Lark grammar, from the Python API, the CLI and the server
(through the official openai client); a schema or grammar that cannot compile is refused before
anything is generated, never answered unconstrained; an answer cut by max_tokens says "length".

The tiny model's weights are random: what it says means nothing, but every answer it gives
under a grammar must follow it. The demo model's 100 answers are in test_demo_model.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from owl2_edge.constrain import GrammarError

jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (the dev extra)")

# Every value is bounded, so a constrained answer always completes within a few dozen tokens.
SCHEMA = {"type": "object",
          "properties": {"colour": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["colour", "count", "ok", "tags"], "additionalProperties": False}
YES_NO_GBNF = 'root ::= "yes" | "no"'
YES_NO_LARK = 'start: "yes" | "no"'


def _picture(seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_answers_follow_a_json_schema(owl, temperature):
    for seed in range(6):
        text = owl.ask(_picture(seed), "Describe it as JSON.", temperature=temperature, seed=seed,
                       max_tokens=120, response_format={"type": "json_schema", "json_schema": {
                           "name": "picture", "schema": SCHEMA, "strict": True}})
        assert owl.stats.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        # The answer ended where the grammar was complete: no token was spent on an EOS.
        assert owl.stats.generated_tokens == len(owl.stats.tokens)


def test_every_form_of_constraint(owl):
    any_object = owl.ask(_picture(1), "JSON please.", temperature=0, max_tokens=200,
                         response_format={"type": "json_object"})
    if owl.stats.finish_reason == "stop":
        assert isinstance(json.loads(any_object), dict)
    else:  # a free JSON object may run to max_tokens on random weights: a prefix of one
        assert any_object.startswith("{")
    for kwargs in ({"grammar": YES_NO_GBNF}, {"grammar": YES_NO_LARK},
                   {"json_schema": {"enum": ["yes", "no"]}}):
        text = owl.ask(_picture(2), "Is it red?", temperature=0.9, seed=1, **kwargs)
        assert text.strip('"') in ("yes", "no") and owl.stats.finish_reason == "stop", kwargs
    # {"type": "text"} is no constraint at all: the same greedy answer as without it, cut at 3.
    text = owl.ask(_picture(2), "Is it red?", temperature=0, response_format={"type": "text"},
                   max_tokens=3)
    tokens = owl.stats.tokens
    assert owl.stats.finish_reason == "length" and len(tokens) == 3
    assert owl.ask(_picture(2), "Is it red?", temperature=0, max_tokens=3) == text
    assert owl.stats.tokens == tokens


def test_an_answer_cut_by_max_tokens_says_length(owl):
    schema = {"type": "object", "properties": {"story": {"type": "string"}},
              "required": ["story"]}
    text = owl.ask([], "Tell a story.", json_schema=schema, temperature=0, max_tokens=4)
    assert owl.stats.finish_reason == "length" and owl.stats.generated_tokens == 4
    assert text.startswith('{"story": ') or text.startswith("{")   # incomplete JSON, as documented
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("kwargs, param, message", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "must be"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "cannot be compiled"),
    ({"json_schema": [1, 2]}, "json_schema", "schema object"),
    ({"json_schema": {"type": "string", "pattern": "(unclosed"}}, "json_schema",
     "cannot be compiled"),
    ({"grammar": "root ::= nothere"}, "grammar", "cannot be compiled"),
    ({"grammar": "start: (((("}, "grammar", "cannot be compiled"),
    ({"grammar": ""}, "grammar", "non-empty"),
    ({"grammar": YES_NO_GBNF, "json_schema": SCHEMA}, "grammar", "give one of"),
    ({"grammar": YES_NO_GBNF, "ignore_eos": True}, "ignore_eos", "cannot be combined"),
])
def test_what_cannot_constrain_is_refused_before_any_answer(owl, kwargs, param, message):
    expected = owl.ask(_picture(3), "Anything?", temperature=0, max_tokens=2)
    tokens = owl.stats.tokens
    with pytest.raises(GrammarError, match=message) as e:
        owl.ask(_picture(3), "Anything?", **kwargs)
    assert e.value.param == param
    # Nothing of the refused request stays behind: the next answer is the unconstrained one.
    assert owl.ask(_picture(3), "Anything?", temperature=0, max_tokens=2) == expected
    assert owl.stats.tokens == tokens and len(tokens) == 2 and owl.stats.finish_reason == "length"


def test_constrained_and_free_answers_run_together(tiny_model_dir):
    """Concurrent answers in one engine pass: each keeps its own grammar, or none."""
    from owl2_edge.owl2 import Owl2
    with Owl2.load(tiny_model_dir, device="cpu", kv_type="f32", n_ctx=1024, parallel=4) as owl:
        results = {}

        def ask(k):
            kwargs = {"json_schema": SCHEMA} if k % 2 == 0 else {}
            results[k] = owl.ask(_picture(k), "Describe it.", temperature=0, max_tokens=60,
                                 **kwargs)
        threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for k in (0, 2):
            jsonschema.validate(json.loads(results[k]), SCHEMA)
        alone = owl.ask(_picture(1), "Describe it.", temperature=0, max_tokens=60)
        assert results[1] == alone
        batch = list(owl.batch([(_picture(k), "Describe it.") for k in range(3)], parallel=2,
                               temperature=0, max_tokens=60, json_schema=SCHEMA))
        for r in batch:
            jsonschema.validate(json.loads(r.answer), SCHEMA)


# -- the server -----------------------------------------------------------------------------------

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")


@pytest.fixture(scope="module")
def api(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def _message(text="Describe the picture."):
    import base64
    import io
    buf = io.BytesIO()
    _picture(5).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_the_server_answers_response_format_streamed_and_not(api):
    response_format = {"type": "json_schema", "json_schema": {"name": "picture",
                                                              "schema": SCHEMA, "strict": True}}
    reply = api.chat.completions.create(model="owl2", messages=_message(), temperature=0,
                                        max_tokens=120, response_format=response_format)
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    assert reply.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(model="owl2", messages=_message(), temperature=0,
                                         max_tokens=120, response_format=response_format,
                                         stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


def test_the_server_takes_llama_cpp_s_json_schema_and_grammar_fields(api):
    reply = api.chat.completions.create(model="owl2", messages=_message("Yes or no?"),
                                        temperature=0, extra_body={"grammar": YES_NO_GBNF})
    assert reply.choices[0].message.content in ("yes", "no")
    reply = api.completions.create(model="owl2", prompt="USER: Yes or no? ASSISTANT:",
                                   temperature=0, max_tokens=200,
                                   extra_body={"json_schema": SCHEMA})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


def test_the_server_refuses_what_cannot_constrain_with_a_400_naming_the_field(api):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    for kwargs, param, message in (
            ({"response_format": bad}, "response_format.json_schema.schema", "Invalid type"),
            ({"response_format": {"type": "yaml"}}, "response_format.type", "must be"),
            ({"extra_body": {"grammar": "root ::= nothere"}}, "grammar", "cannot be compiled")):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model="owl2", messages=_message(), **kwargs)
        assert e.value.body["param"] == param, e.value.body
        assert message in e.value.body["message"], e.value.body


def test_props_lists_the_supported_fields(tiny_server):
    import urllib.request
    with urllib.request.urlopen(tiny_server.url + "/props", timeout=30) as r:
        props = json.loads(r.read())
    supported = " ".join(props["supported_fields"])
    for name in ("response_format", "json_schema", "grammar", "seed", "stop"):
        assert name in supported
    assert "response_format" not in props["unsupported_fields"]


# -- the CLI --------------------------------------------------------------------------------------

def _owl2(*args):
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_the_cli_takes_a_schema_inline_or_from_a_file_and_a_grammar_file(tiny_model_dir, tmp_path):
    picture = tmp_path / "p.png"
    _picture(6).save(picture)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    grammar_file = tmp_path / "yn.gbnf"
    grammar_file.write_text(YES_NO_GBNF)
    base = ["ask", "-m", str(tiny_model_dir), "--device", "cpu", "--temperature", "0", "-n", "100",
            str(picture), "Describe it."]
    for option in (json.dumps(SCHEMA), str(schema_file)):
        run = _owl2(*base, "--json-schema", option)
        assert run.returncode == 0, run.stderr
        jsonschema.validate(json.loads(run.stdout), SCHEMA)
    run = _owl2(*base, "--grammar", str(grammar_file))
    assert run.returncode == 0 and run.stdout.strip() in ("yes", "no"), run.stderr
    for extra, message in ((["--json-schema", '{"type": "objekt"}'], "cannot be compiled"),
                           (["--json-schema", "{not json"], "not valid JSON"),
                           (["--json-schema", str(tmp_path / "none.json")], "no such file"),
                           (["--grammar", str(tmp_path)], "folder"),
                           (["--grammar", str(grammar_file), "--ignore-eos"], "ignore_eos")):
        run = _owl2(*base, *extra)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
