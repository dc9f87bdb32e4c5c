"""ollama's API over the same engine (docs/clients.md): POST /api/chat and /api/generate, GET
/api/tags, /api/ps and /api/version, POST /api/show. An app written for ollama (its client
library, or anything that speaks its protocol) runs on owl2-edge unchanged.

A body becomes what every route hands the engine (answering.start_choices: one prompt with its
images, SamplingParams, a constraint) and the answer is written back as ollama writes it: one
JSON object, or with `stream` (ollama's default: true) one JSON object per line, the last with
`done: true`, `done_reason` and the counts and durations in nanoseconds. A field or option this
server cannot act on is refused with a 400 naming it, in ollama's error shape ({"error": ...}),
never accepted and ignored; `keep_alive` is taken (the model stays loaded).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from owl2_edge import names, openai_chat, tool_calls
from owl2_edge.errors import GrammarError, Owl2Error, PromptError
from owl2_edge.prompt import Turn, render
from owl2_edge.serve import fields
from owl2_edge.serve.answer import ClientGone, Reply
from owl2_edge.serve.answering import (AnswerStream, check_image_count, close_all,
                                       prepare_request, read_body, read_whole, start_choices)
from owl2_edge.serve.limits import ApiError, bad_request

if TYPE_CHECKING:
    from starlette.requests import Request

    from owl2_edge.serve.app import Server

# options -> SamplingParams' field (ollama's names for llama.cpp's sampling options).
_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "seed": "seed", "num_predict": "max_tokens", "stop": "stop",
            "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
            "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Options whose value here changes nothing (each is accepted only as that value), as the
# OpenAI routes take a field that asks for nothing.
_NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
_CHAT_FIELDS = {"model", "messages", "stream", "format", "options", "keep_alive", "tools", "think",
                "logprobs", "top_logprobs"}
_GENERATE_FIELDS = {"model", "prompt", "suffix", "images", "system", "template", "context",
                    "stream", "raw", "format", "options", "keep_alive", "think", "logprobs",
                    "top_logprobs"}
# Fields taken only with the value that asks for nothing, and why.
_ONLY_EMPTY = {"suffix": "no insertion after the answer",
               "template": "the model's own template is used",
               "context": "a conversation goes in messages (/api/chat)"}
_ONLY_FALSE = {"think": "this model does not think apart from its answer",
               "logprobs": "log probabilities are offered on /v1/chat/completions"}


def error_body(e: ApiError) -> dict:
    """ollama's error object."""
    return {"error": e.message}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- the request ----------------------------------------------------------------------------------

def _check_fields(body: dict, known: set) -> None:
    for name in body:
        if name not in known:
            raise bad_request(f"unknown field {name!r}: this server does not act on it",
                              param=name)
    for name, why in _ONLY_EMPTY.items():
        if body.get(name) not in (None, "", [], {}):
            raise bad_request(f"{name} is not supported by this server ({why})", param=name)
    for name, why in _ONLY_FALSE.items():
        if body.get(name) not in (None, False):
            raise bad_request(f"{name} is not supported by this server ({why})", param=name)
    if body.get("top_logprobs") not in (None, 0):
        raise bad_request("top_logprobs is not supported by this server (log probabilities are "
                          "offered on /v1/chat/completions)", param="top_logprobs")
    _check_model_name(body.get("model"))


def _check_model_name(model) -> None:
    """Any name is answered by this server's one model, but it is echoed: a text of at most
    200 characters that UTF-8 can carry."""
    if not isinstance(model, str) or not 0 < len(model) <= 200 or \
            not model.isprintable() or model != model.encode("utf-8", "replace").decode():
        raise bad_request("model is required: a name of 1-200 printable characters (any name: "
                          "this server answers with its one model)", param="model")


def _sampling(body: dict, server: Server):
    """SamplingParams from `options` and `format`, refused by their ollama names."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_request("options must be an object", param="options")
    chosen, names_of = {}, {}
    for name, value in options.items():
        if value is None:
            continue
        if name in _OPTIONS:
            chosen[_OPTIONS[name]], names_of[_OPTIONS[name]] = value, f"options.{name}"
        elif name == "num_ctx":
            if not isinstance(value, int) or isinstance(value, bool) or value > server.owl.window:
                raise bad_request(f"options.num_ctx {value!r}: an answer here holds at most "
                                  f"{server.owl.window} positions (owl2 serve --ctx, "
                                  f"--parallel)", param="options.num_ctx")
        elif name in _NEUTRAL_OPTIONS and value == _NEUTRAL_OPTIONS[name]:
            continue
        else:
            raise bad_request(f"options.{name} is not supported by this server",
                              param=f"options.{name}")
    if chosen.get("max_tokens") in (-1, -2):  # ollama's "until the end" and "fill the context"
        chosen["max_tokens"] = server.limits.max_tokens
    form = body.get("format")
    if form == "json":
        chosen["response_format"], names_of["response_format"] = {"type": "json_object"}, "format"
    elif isinstance(form, dict):
        chosen["json_schema"], names_of["json_schema"] = form, "format"
    elif form not in (None, ""):
        raise bad_request('format must be "json" or a JSON schema', param="format")
    try:
        return fields.sampling_params(chosen, server.limits)
    except ApiError as e:  # named by the OpenAI field it maps to: name it as ollama does
        if e.param not in names_of:
            raise
        theirs = names_of[e.param]
        raise ApiError(e.status, e.message.replace(e.param, theirs, 1), theirs, e.code) from None


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", param=name)
    return value


def _images(value, param: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{param} must be a list of base64 strings", param=param)
    return value


def _calls(calls, i: int) -> list[dict]:
    """An assistant message's ollama tool_calls ({"function": {"name", "arguments": {...}}})
    in the OpenAI route's form (arguments as a JSON string)."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), dict) for c in calls):
        raise bad_request(f'messages[{i}].tool_calls: each must be {{"function": {{"name": ..., '
                          f'"arguments": {{...}}}}}}', param="messages")
    return [{"type": "function", "function": {"name": c["function"]["name"],
                                              "arguments": json.dumps(c["function"]["arguments"])}}
            for c in calls]


def _chat_prompt(messages, functions: list[dict] | None = None) -> tuple[str, list]:
    """ollama's messages (content a string, images a list of base64 strings beside it) -> the
    templated prompt and its images' sources, through the OpenAI route's rules; functions: the
    tools offered (tool_calls.py)."""
    if not isinstance(messages, list):
        raise bad_request("messages must be a list of {role, content, images}", param="messages")
    converted = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param="messages")
        # tool_name (which tool answered) is not part of the prompt form (tool_calls.py), as
        # tool_call_id is not on the OpenAI route: the answer follows the call it answers.
        unknown = set(m) - {"role", "content", "images", "thinking", "tool_calls", "tool_name"}
        if unknown or m.get("thinking"):
            raise bad_request(f"messages[{i}]: {sorted(unknown or {'thinking'})[0]!r} is not "
                              f"supported by this server", param="messages")
        text = m.get("content") or ""
        if not isinstance(text, str):
            raise bad_request(f"messages[{i}].content must be a string", param="messages")
        parts = [{"type": "image_url", "image_url": {"url": image}}
                 for image in _images(m.get("images"), f"messages[{i}].images")]
        message = {"role": m.get("role"), "content": [*parts, {"type": "text", "text": text}]}
        if m.get("tool_calls"):
            message["tool_calls"] = _calls(m["tool_calls"], i)
        converted.append(message)
    try:
        return openai_chat.messages_to_prompt(converted, read_image=lambda url: url,
                                              functions=functions)
    except PromptError as e:
        raise bad_request(str(e), param="messages") from None


# -- the routes -----------------------------------------------------------------------------------

async def chat(request: Request, server: Server) -> Response:
    started, deadline = time.perf_counter(), server.deadline()
    body = await read_body(request, server, deadline)
    _check_fields(body, _CHAT_FIELDS)
    params, stream = _sampling(body, server), _flag(body, "stream", True)
    if not body.get("messages"):  # ollama's way to load a model: nothing to answer
        return JSONResponse({"model": body["model"], "created_at": _now(),
                             "message": {"role": "assistant", "content": ""}, "done": True,
                             "done_reason": "load"})
    # ollama has no tool_choice: with tools, an answer is a call or a reply (tool_calls.py).
    if body.get("tools") and body.get("format"):
        raise bad_request("tools cannot be combined with format: an answer follows one grammar",
                          param="tools")
    functions, callable_, params = tool_calls.offer(body.get("tools"), None, params)
    may_call = callable_[1] if callable_ else None
    prompt, sources = _chat_prompt(body["messages"], functions)
    check_image_count(len(sources), server.limits, "messages")

    def prepare():
        return prepare_request(server, prompt, sources, "messages", lambda i: f"image {i + 1}",
                               deadline)

    def message(text: str, call: tuple[str, dict] | None = None) -> dict:
        if call is None and may_call and text:
            call = tool_calls.parse_call(text, may_call)
        if call is not None:
            name, arguments = call
            return {"message": {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": name, "arguments": arguments}}]}}
        return {"message": {"role": "assistant", "content": text}}
    return await _answer(request, server, prepare, params, stream, started, deadline, message,
                         body["model"], may_call)


async def generate(request: Request, server: Server) -> Response:
    started, deadline = time.perf_counter(), server.deadline()
    body = await read_body(request, server, deadline)
    _check_fields(body, _GENERATE_FIELDS)
    params, stream = _sampling(body, server), _flag(body, "stream", True)
    prompt, system = body.get("prompt") or "", body.get("system")
    sources = _images(body.get("images"), "images")
    check_image_count(len(sources), server.limits, "images")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise bad_request("prompt and system must be strings", param="prompt")
    if not prompt and not sources:  # ollama's way to load a model
        return JSONResponse({"model": body["model"], "created_at": _now(), "response": "",
                             "done": True, "done_reason": "load"})
    if _flag(body, "raw", False):  # the prompt as it is: <|image|> marks each image's place
        if system:
            raise bad_request("system goes into the template: it cannot be given with raw",
                              param="system")
    else:
        prompt = render([Turn(names.IMAGE_PLACEHOLDER * len(sources) + prompt)],
                        n_images=len(sources), system=system or None)

    def prepare():
        return prepare_request(server, prompt, sources, "images", lambda i: f"images[{i}]",
                               deadline)
    return await _answer(request, server, prepare, params, stream, started, deadline,
                         lambda text: {"response": text}, body["model"])


async def _answer(request: Request, server: Server, prepare, params, stream: bool,
                  started: float, deadline: float, content, model: str,
                  may_call: list[dict] | None = None) -> Response:
    """The one answer, as one object or as lines. content(text[, call]) -> the fields that
    carry text (chat's message, generate's response) or a tool call; may_call: the functions
    an answer may call (chat's tools)."""
    try:
        (choice,), (first,) = await start_choices(request, server, prepare, [params], True,
                                                  deadline, started)
    except ClientGone:
        return Response(status_code=499)
    except GrammarError as e:  # `format`'s schema or the tools' grammar, as the client named it
        theirs = {"json_schema": "format", "response_format": "format", "grammar": "tools"}
        if e.param not in theirs:
            raise
        raise bad_request(str(e).replace(e.param, theirs[e.param], 1),
                          param=theirs[e.param]) from None
    if stream:
        return AnswerStream(_lines(request, choice, first, content, model, started, may_call),
                            [choice], media_type="application/x-ndjson")
    text = await read_whole(request, choice, first)
    if text is None:
        return Response(status_code=499)
    return JSONResponse({**_head(model), **content(text), **_done(choice, started)})


def _head(model: str) -> dict:
    return {"model": model, "created_at": _now()}


def _done(choice: Reply, started: float) -> dict:
    """The last object's fields: why it ended, and ollama's counts and durations (ns)."""
    stats, ns = choice.usage_stats(), 1e9
    t = stats.timings
    return {"done": True, "done_reason": "stop" if choice.finish == "stop" else "length",
            "total_duration": int((time.perf_counter() - started) * ns),
            "load_duration": int(t.get("load_wait", 0.0) * ns),
            "prompt_eval_count": stats.prompt_positions,
            "prompt_eval_duration": int(t.get("prefill", 0.0) * ns),
            "eval_count": stats.generated_tokens,
            "eval_duration": int(t.get("decode", 0.0) * ns)}


async def _lines(request: Request, choice: Reply, first, content, model: str, started: float,
                 may_call: list[dict] | None = None):
    """One JSON object per line: each piece, then the last with `done`; an error after the
    first line is the stream's last line ({"error": ...}, as ollama writes it). A text that may
    be a tool call is held to the end and sent as one line with the call (as ollama sends
    tool_calls)."""
    def line(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
    text, held = first, tool_calls.HeldCall(may_call)
    try:
        while True:
            if text and not held.hold(text):
                yield line({**_head(model), **content(text), "done": False})
            if choice.finish is not None:
                break
            if await request.is_disconnected():
                return
            text = await choice.next()
    except Owl2Error as e:
        await close_all([choice])
        yield line({"error": str(e)})
        return
    await close_all([choice])
    call = held.end()
    if call is not None:
        yield line({**_head(model), **content("", call), "done": False})
    elif held.text:  # it looked like a call and was not one (cut short)
        yield line({**_head(model), **content(held.text), "done": False})
    yield line({**_head(model), **content(""), **_done(choice, started)})


# -- the model ------------------------------------------------------------------------------------

def _details(server: Server) -> dict:
    return {"parent_model": "", "format": "gguf", "family": "llama",
            "families": ["llama", "clip"], "quantization_level": server.owl.manifest.quant}


def _entry(server: Server) -> dict:
    owl = server.owl
    folder, manifest = owl.folder, owl.manifest
    size = sum((folder / name).stat().st_size for name in manifest.files())
    modified = datetime.fromtimestamp((folder / names.MANIFEST_FILE).stat().st_mtime,
                                      timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": server.model_id, "model": server.model_id, "modified_at": modified,
            "size": size, "digest": manifest.pair_id, "details": _details(server)}


async def tags(request: Request, server: Server) -> Response:
    return JSONResponse({"models": [_entry(server)]})


async def ps(request: Request, server: Server) -> Response:
    entry = _entry(server)
    on_gpu = server.owl.decoder.device != "cpu"
    return JSONResponse({"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z",
                                     "size_vram": entry["size"] if on_gpu else 0,
                                     "context_length": server.owl.engine.n_ctx}]})


async def show(request: Request, server: Server) -> Response:
    body = await read_body(request, server, server.deadline())
    _check_model_name(body.get("model") or body.get("name"))
    d = server.owl.manifest.decoder
    return JSONResponse({
        "modelfile": "", "parameters": "", "license": "",
        "template": render([Turn("{{ .Prompt }}")]),
        "details": _details(server),
        "model_info": {"general.architecture": "llama", "llama.block_count": d.n_layer,
                       "llama.embedding_length": d.n_embd,
                       "llama.context_length": server.owl.engine.n_ctx,
                       "llama.vocab_size": d.n_vocab},
        "capabilities": ["completion", "vision", "tools"],
        "modified_at": _entry(server)["modified_at"]})


async def version(request: Request, server: Server) -> Response:
    from owl2_edge import __version__
    return JSONResponse({"version": __version__})
