"""Constraints an attacker would send (owl2_edge/constraint_bounds.py, docs/structured.md,
"Bounds"): each is refused by name before anything is compiled or answered, or answered within
the bounds; a limit the grammar engine still reaches in the middle of an answer ends it with a
clean error in the protocol's shape (a 400 before the first byte, an error event in a stream),
never a 5xx, never a stuck slot; a slow compile never holds the event loop."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from owl2_edge import constrain, constraint_bounds
from owl2_edge.constraint_bounds import BOUNDS, ConstraintBounds
from owl2_edge.errors import GrammarError


def _alternatives(n: int, prefix: str = "") -> str:
    return f"root ::= {prefix}(" + " | ".join(f'"w{i}"' for i in range(n)) + ")"


# (what the client sends, the field the refusal names, words of the message)
HOSTILE = [
    ({"grammar": _alternatives(20000)}, "grammar", "bytes; at most"),
    ({"grammar": _alternatives(3000)}, "grammar", "alternatives"),
    ({"grammar": 'start: "a" | ' + " | ".join(f'"b{i}"' for i in range(1200))}, "grammar",
     "alternatives"),
    ({"grammar": 'root ::= "a"{1000000}'}, "grammar", "a count of 1,000,000"),
    ({"grammar": 'start: /a{0,99999}/'}, "grammar", "a count of 99,999"),
    ({"json_schema": {"type": "string", "pattern": "^a{1000000}$"}}, "json_schema",
     "a count of 1,000,000"),
    ({"json_schema": {"type": "object", "patternProperties": {"^x{50000}$": {}}}},
     "json_schema", "a count of 50,000"),
    ({"json_schema": {"$ref": "#"}}, "json_schema", "$ref cycle"),
    ({"json_schema": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                      "$ref": "#/$defs/a"}}, "json_schema", "$ref cycle"),
    ({"json_schema": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "json_schema",
     "$ref cycle"),
    ({"json_schema": {"type": "string", "minLength": 10**9}}, "json_schema", "minLength"),
    ({"json_schema": {"type": "array", "minItems": 10**9}}, "json_schema", "minItems"),
    ({"json_schema": {"type": "object", "minProperties": 10**6}}, "json_schema",
     "minProperties"),
    ({"json_schema": json.loads('{"type": "array", "items": ' * 80 + "{}" + "}" * 80)},
     "json_schema", "nests deeper than 64"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#"}}}}, "response_format.json_schema.schema", "$ref cycle"),
]

# Recursion through a value's part is fine, and so are large upper bounds and enums.
FINE = [
    {"json_schema": {"$defs": {"node": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"}},
    {"json_schema": {"type": "string", "maxLength": 10**9}},
    {"json_schema": {"enum": [f"w{i}" for i in range(3000)]}},
    {"grammar": _alternatives(BOUNDS.max_alternatives)},
    {"grammar": 'root ::= "a"{3} [b|c]{2}'},
]


def _picture():
    from PIL import Image
    return Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("field,param,message", HOSTILE,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(HOSTILE)])
def test_the_api_refuses_each_by_name_before_answering(owl, field, param, message):
    t = time.monotonic()
    with pytest.raises(GrammarError) as e:
        owl.ask(_picture(), "Go.", temperature=0, max_tokens=4, **field)
    assert e.value.param == param and message in str(e.value), str(e.value)
    assert time.monotonic() - t < 5  # refused from the source, not after a long compile
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", FINE, ids=[str(i) for i in range(len(FINE))])
def test_what_is_within_the_bounds_is_answered(owl, field):
    owl.ask(_picture(), "Go.", temperature=0, max_tokens=24, **field)
    assert owl.stats.generated_tokens >= 1


def test_an_answer_that_cannot_satisfy_its_schema_in_max_tokens_says_length(owl):
    text = owl.ask(_picture(), "Go.", temperature=0, max_tokens=5,
                   json_schema={"type": "string", "minLength": 200})
    assert owl.stats.finish_reason == "length" and owl.stats.generated_tokens == 5
    assert text.startswith('"') and not text.endswith('"')  # an unfinished string, said so


@pytest.fixture
def tight_parser(monkeypatch):
    """llguidance's items per mask step lowered (20 for its 50,000): a grammar the source
    checks let through, whose fixed words come out first and whose address part then needs
    more items than that, so the grammar engine stops in the middle of the answer."""
    tight = ConstraintBounds(step_max_items=20)
    monkeypatch.setattr(constraint_bounds, "BOUNDS", tight)
    monkeypatch.setattr(constrain, "BOUNDS", tight)
    return ('root ::= "Alpha beta." " " [a-z0-9]{3,8} "@" [a-z]{2,9} "." '
            '("com" | "org" | "net")')


def test_a_limit_reached_mid_answer_ends_it_with_a_grammar_error(owl, tight_parser):
    pieces = []
    with pytest.raises(GrammarError, match="the grammar engine stopped") as e:
        for piece in owl.stream(_picture(), "Go.", temperature=0, max_tokens=40,
                                grammar=tight_parser):
            pieces.append(piece)
    assert e.value.param == "grammar"
    assert "".join(pieces).startswith("Alpha beta.")  # the error came mid-answer
    # Nothing is stuck: the next answer comes, and the engine holds no answer.
    assert owl.ask(_picture(), "Go.", temperature=0, max_tokens=3) == \
        owl.ask(_picture(), "Go.", temperature=0, max_tokens=3)
    assert owl.engine.n_running == 0


def _post(url: str, body: dict, timeout: float = 60):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _chat(**fields) -> dict:
    return {"model": "owl2", "max_tokens": 30, "temperature": 0,
            "messages": [{"role": "user", "content": "Go."}], **fields}


def test_the_server_answers_each_with_a_400_naming_the_field(tiny_server):
    for field, param, message in HOSTILE:
        if "response_format" not in field and len(json.dumps(field)) > 60_000:
            continue  # (the body limit is another test's)
        status, body = _post(tiny_server.url + "/v1/chat/completions", _chat(**field))
        assert status == 400, (field, body)
        error = json.loads(body)["error"]
        assert error["param"] == param and message in error["message"], error


def test_the_server_lists_the_bounds_in_props(tiny_server):
    with urllib.request.urlopen(tiny_server.url + "/props", timeout=30) as r:
        props = json.loads(r.read())
    assert props["limits"]["constraints"] == BOUNDS.to_dict()


def test_the_server_ends_a_mid_answer_failure_cleanly(tiny_server, tight_parser):
    url = tiny_server.url + "/v1/chat/completions"
    # Not streamed: nothing was sent yet, so a 400 naming the field.
    status, body = _post(url, _chat(grammar=tight_parser))
    assert status == 400 and json.loads(body)["error"]["param"] == "grammar", body
    # Streamed: the 200 went out with the first piece; the error is the stream's last event.
    status, body = _post(url, _chat(grammar=tight_parser, stream=True))
    assert status == 200
    events = [json.loads(line[6:]) for line in body.splitlines()
              if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e.get("choices")).startswith("Alpha beta.")
    assert events[-1]["error"]["code"] == "grammar_error", events[-1]
    assert "[DONE]" not in body
    # And the slot is free: the next request is answered.
    status, body = _post(url, _chat(max_tokens=3))
    assert status == 200 and tiny_server.owl.engine.n_running == 0


def test_a_slow_compile_holds_neither_the_event_loop_nor_the_engine(tiny_server, monkeypatch):
    """A compile that takes seconds (slowed here) costs its own request only: /health and
    another client's answer come meanwhile; past BOUNDS.compile_seconds the request is a 400."""
    real, started, compiled = constrain.Constraint.compile, threading.Event(), threading.Event()

    def slow(spec, tokenizer, *to_lark):
        started.set()
        time.sleep(3.0)
        try:
            return real(spec, tokenizer, *to_lark)
        finally:
            compiled.set()
    monkeypatch.setattr(constrain.Constraint, "compile", staticmethod(slow))
    grammar = 'root ::= "slow" | "compile"'
    result = {}
    hostile = threading.Thread(target=lambda: result.setdefault(
        "reply", _post(tiny_server.url + "/v1/chat/completions", _chat(grammar=grammar))))
    hostile.start()
    assert started.wait(30)
    t = time.monotonic()
    with urllib.request.urlopen(tiny_server.url + "/health", timeout=30) as r:
        assert r.status == 200
    status, _ = _post(tiny_server.url + "/v1/chat/completions", _chat(max_tokens=3))
    assert status == 200 and time.monotonic() - t < 2.5  # answered while the compile ran
    hostile.join(60)
    assert result["reply"][0] == 200
    # Past the compile deadline: refused by name, the compile left to finish on its own.
    short = ConstraintBounds(compile_seconds=0.5)
    monkeypatch.setattr(constraint_bounds, "BOUNDS", short)
    from owl2_edge.serve import answering
    monkeypatch.setattr(answering, "BOUNDS", short)
    status, body = _post(tiny_server.url + "/v1/chat/completions",
                         _chat(grammar='root ::= "late"'))
    assert status == 400 and "took longer than 0.5 s to compile" in body, body
    compiled.clear()
    assert compiled.wait(30)  # the abandoned compile ends on its own, its grammar kept


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own priority is Linux's")
def test_the_server_compiles_on_one_thread_at_the_lowest_priority(tiny_server):
    """The compile thread runs at nice 19, and only it: the engine and the event loop keep the
    process's priority, so a stream of compiles runs on what the answers leave."""
    status, _ = _post(tiny_server.url + "/v1/chat/completions",
                      _chat(grammar='root ::= "low" | "priority"'))
    assert status == 200
    compilers = [t for t in threading.enumerate() if t.name.startswith("owl2-compile")]
    assert len(compilers) == 1
    assert os.getpriority(os.PRIO_PROCESS, compilers[0].native_id) == 19
    others = [t for t in threading.enumerate() if t is not compilers[0]]
    assert {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in others
            if t.native_id is not None} == {os.getpriority(os.PRIO_PROCESS, 0)}


@pytest.mark.skipif(sys.platform != "linux", reason="a process's priority read as Linux's")
def test_the_server_converts_gbnf_in_a_child_process_at_the_lowest_priority(tiny_server):
    """GBNF becomes Lark (Python work, holding the interpreter lock) in the compile thread's
    child process, at nice 19: the server's own process does none of it."""
    from owl2_edge.serve import answering
    grammar = 'root ::= "child" | "process"'
    status, body = _post(tiny_server.url + "/v1/chat/completions", _chat(grammar=grammar))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] in ("child", "process")
    pid = answering._CONVERTER.pid
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19
    # A bound broken is refused there, with the message the server's own check gives.
    status, body = _post(tiny_server.url + "/v1/chat/completions",
                         _chat(grammar=_alternatives(1001)))
    assert status == 400 and "more than 1,000 alternatives" in body, body
    assert answering._CONVERTER.pid == pid  # a refusal ends nothing


def test_a_conversion_past_its_time_kills_its_child_and_the_next_one_starts_afresh():
    """The converter is killed past the request's time (its CPU is bounded, not only its
    reply): a GrammarError naming the field, and the next grammar gets a new child; a child
    that died between grammars is replaced too."""
    from owl2_edge.grammar_worker import LarkWorker, lark_of
    worker = LarkWorker()
    try:
        grammar = _alternatives(900)
        with pytest.raises(GrammarError, match="grammar took longer than 0 s") as e:
            worker.lark(grammar, "grammar", seconds=0.0)
        assert e.value.param == "grammar"
        assert worker.pid is None
        assert worker.lark(grammar, "grammar", seconds=30) == lark_of(grammar, "grammar")
        first = worker.pid
        os.kill(first, 9)
        assert worker.lark('root ::= "again"', "grammar", seconds=30) == \
            lark_of('root ::= "again"', "grammar")
        assert worker.pid != first
        with pytest.raises(GrammarError, match="cannot be compiled") as e:
            worker.lark("root ::= (", "x.grammar", seconds=30)
        assert e.value.param == "x.grammar"
    finally:
        worker.close()


def test_a_converter_that_cannot_start_is_one_grammar_error(monkeypatch):
    """No process to convert in (out of processes, say): the grammar is refused by name, as
    GrammarError, not a server error, and a later grammar may start one."""
    from owl2_edge import grammar_worker

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")
    worker = grammar_worker.LarkWorker()
    with monkeypatch.context() as patched:
        patched.setattr(grammar_worker.subprocess, "Popen", no_process)
        with pytest.raises(GrammarError, match="could not be converted") as e:
            worker.lark('root ::= "x"', "grammar", seconds=5)
    assert e.value.param == "grammar" and worker.pid is None
    try:
        assert worker.lark('root ::= "x"', "grammar", seconds=30)
    finally:
        worker.close()


def test_every_answer_starts_from_the_mask_computed_at_compile(owl):
    """The first mask is computed once, at compile (off the engine's thread); it equals the
    mask a fresh matcher computes, and after a token each answer computes its own."""
    spec = constrain.ConstraintSpec.json_schema({"enum": ["alpha", "beta"]}, "json_schema")
    constraint = owl.constraint(spec)
    first, second = constraint.start(), constraint.start()
    assert first.allowed() is second.allowed()  # not computed again
    fresh = constrain.ConstraintState(constraint._matcher.deep_copy(), constraint.n_vocab, "x")
    assert np.array_equal(first.allowed(), fresh.allowed())
    token = int(np.flatnonzero(first.allowed())[0])
    first.advance(token)
    fresh.advance(token)
    assert np.array_equal(first.allowed(), fresh.allowed())
    assert not np.array_equal(first.allowed(), second.allowed())
