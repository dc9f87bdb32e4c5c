"""OpenAI's Responses API over the same engine (docs/clients.md): POST /v1/responses (and
/responses, as llama-server mirrors it).

A body becomes what every route hands the engine (answering.start_choices): `input` (a string,
or items: messages whose parts are input_text and input_image, earlier function calls and their
outputs) and `instructions` become chat messages and then the model's prompt, as on
/v1/chat/completions; `text.format` and function `tools` become the answer's grammar. The answer
is written back as a `response` object whose `output` holds one message (an output_text part) or
one function_call, or with `stream` as the typed events OpenAI's SDK reads:

    response.created, response.in_progress,
    response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done,
    response.content_part.done, response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens ended it)

(a function call: output_item.added, function_call_arguments.delta and .done, output_item.done).
Nothing is stored: `store: true`, `previous_response_id` and `conversation` are refused by
name, as is every other field this server cannot act on.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse, Response

from owl2_edge import tool_calls
from owl2_edge.errors import GrammarError, Owl2Error
from owl2_edge.serve import field_table, fields
from owl2_edge.serve.field_table import RESPONSES
from owl2_edge.serve.answer import ClientGone, Reply
from owl2_edge.serve.answering import (AnswerStream, check_image_count, close_all,
                                       prepare_messages, read_body, read_whole, start_choices)
from owl2_edge.serve.images import count_image_parts
from owl2_edge.serve.limits import ApiError, bad_request, error_body

if TYPE_CHECKING:
    from starlette.requests import Request

    from owl2_edge.serve.app import Server

# Read here and turned into the chat route's names, so that fields.sampling_params checks each
# as it does there (a 400 is renamed back to the Responses name).
_BUDGET = {"max_output_tokens": "max_tokens"}
_INPUT_HINT = ("a string, or a list of items: messages ({role, content} with input_text and "
               "input_image parts), function_call and function_call_output")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- the request ----------------------------------------------------------------------------------

def _check_fields(body: dict) -> None:
    fields.check_known(body, RESPONSES)
    fields.check_not_implemented(body, RESPONSES)
    for name in ("user", "safety_identifier", "prompt_cache_key", "instructions"):
        value = body.get(name)
        # Echoed in the response: a text that UTF-8 can carry (no lone surrogates).
        if value is not None and (not isinstance(value, str) or
                                  value != value.encode("utf-8", "replace").decode()):
            raise bad_request(f"{name} must be a string of Unicode text", param=name)
    fields.check_metadata(body.get("metadata"))


def _text_format(body: dict) -> dict:
    """text: {"format": {"type": "text" | "json_object" | "json_schema", ...}} -> the chat
    route's response_format ({} when none)."""
    text = body.get("text")
    if text is None:
        return {}
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise bad_request('text must be an object {"format": {...}}', param="text")
    if text.get("verbosity") not in (None, "medium"):
        raise bad_request('text.verbosity is not supported by this server (accepted only as '
                          '"medium": the model has one way of answering)', param="text.verbosity")
    form = text.get("format")
    if form is None:
        return {}
    if not isinstance(form, dict):
        raise bad_request("text.format must be an object such as {\"type\": \"json_object\"}",
                          param="text.format")
    kind = form.get("type")
    if kind == "json_schema":
        inner = {k: v for k, v in form.items() if k != "type"}
        return {"response_format": {"type": "json_schema", "json_schema": inner}}
    return {"response_format": form}


def _sampling(body: dict, server: Server):
    names = {**field_table.sampling(RESPONSES), "seed": "seed", **_BUDGET}
    chosen = {ours: body[theirs] for theirs, ours in names.items() if body.get(theirs) is not None}
    chosen.update(_text_format(body))
    try:
        return fields.sampling_params(chosen, server.limits)
    except ApiError as e:
        raise _renamed(e) from None


def _renamed(e: ApiError) -> ApiError:
    """A 400 from the chat route's checks, naming the field by its Responses name."""
    param = e.param or ""
    theirs = {"max_tokens": "max_output_tokens", "response_format.json_schema": "text.format",
              "response_format": "text.format", "grammar": "tools"}
    for ours, name in theirs.items():
        if param == ours or param.startswith(ours + "."):
            new = name + param[len(ours):]
            return ApiError(e.status, e.message.replace(ours, name), new, e.code)
    return e


def _functions(body: dict) -> tuple[list | None, dict | str | None]:
    """Responses' function tools ({"type": "function", "name", "description", "parameters",
    "strict"}) and tool_choice in the chat route's form."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("tools must be a list of function tools", param="tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise bad_request(f"tools[{i}]: only function tools are offered here, not "
                                  f"{str(kind)[:40]!r}", param="tools")
            unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
            if unknown:
                raise bad_request(f"tools[{i}]: unknown field {sorted(unknown)[0]!r}",
                                  param="tools")
            if tool.get("strict") not in (None, True, False):
                raise bad_request(f"tools[{i}].strict must be true or false", param="tools")
            # strict or not, a call's arguments follow its parameters schema (the grammar).
            converted.append({"type": "function", "function": {
                k: tool[k] for k in ("name", "description", "parameters") if k in tool}})
        tools = converted
    if isinstance(choice, dict):
        if choice.get("type") != "function" or set(choice) != {"type", "name"}:
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": '
                              '"function", "name": ...}', param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _messages(body: dict) -> list[dict]:
    """instructions and input -> chat messages (openai_chat.messages_to_prompt's form)."""
    given, instructions = body.get("input"), body.get("instructions")
    messages = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise bad_request(f"input is required: {_INPUT_HINT}", param="input")
    for i, item in enumerate(given):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object", param="input")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, i))
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise bad_request(f"input[{i}].output must be a string", param="input")
            messages.append({"role": "tool", "content": output})
        else:
            raise bad_request(f"input[{i}]: item type {str(kind)[:40]!r} is not taken here "
                              f"({_INPUT_HINT})", param="input")
    return messages


_PARTS = {"input_text": "text", "output_text": "text", "input_image": "image"}


def _message(item: dict, i: int) -> dict:
    role, content = item.get("role"), item.get("content")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if isinstance(content, str) or content is None:
        return {"role": role, "content": content or ""}
    if not isinstance(content, list):
        raise bad_request(f"input[{i}].content must be a string or a list of parts",
                          param="input")
    parts = []
    for k, part in enumerate(content):
        where = f"input[{i}].content[{k}]"
        kind = _PARTS.get(part.get("type")) if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "image":
            if part.get("file_id") is not None or not isinstance(part.get("image_url"), str):
                raise bad_request(f"{where}: an input_image needs an image_url (a data: URL, or "
                                  f"what `owl2 serve` allows); file ids are OpenAI's",
                                  param="input")
            if part.get("detail") not in (None, "auto"):
                raise bad_request(f"{where}.detail is not supported by this server (accepted "
                                  f'only as "auto": every picture is read at the model\'s one '
                                  f"size)", param="input")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}: part type {str(kind)[:40]!r} is not taken here "
                              f"(input_text, input_image)", param="input")
    return {"role": role, "content": parts}


# -- the route ------------------------------------------------------------------------------------

async def create(request: Request, server: Server) -> Response:
    started, deadline = time.perf_counter(), server.deadline()
    body = await read_body(request, server, deadline)
    _check_fields(body)
    stream = fields.flag(body, "stream")
    params = _sampling(body, server)
    messages = _messages(body)
    tools, choice = _functions(body)
    functions, callable_, params = tool_calls.offer(tools, choice, params)
    check_image_count(count_image_parts(messages), server.limits, "input")

    def prepare():
        return prepare_messages(server, messages, "input", deadline, functions)

    shape = ResponseShape(server.model_id, body, params, callable_[1] if callable_ else None)
    try:
        (reply,), (first,) = await start_choices(request, server, prepare, [params], True,
                                                 deadline, started)
    except ClientGone:
        return Response(status_code=499)
    except GrammarError as e:
        raise _renamed(ApiError(400, str(e), e.param, "grammar_error")) from None
    if stream:
        return AnswerStream(_events(request, server, shape, reply, first), [reply])
    text = await read_whole(request, reply, first)
    if text is None:
        return Response(status_code=499)  # nobody reads it
    return JSONResponse(shape.response(shape.output(text), reply))


class ResponseShape:
    """One response's identity and the objects that carry it."""

    def __init__(self, model: str, body: dict, params, functions: list[dict] | None):
        self.id, self.created = _new_id("resp"), int(time.time())
        self.model, self.body, self.params, self.functions = model, body, params, functions
        self.message_id = _new_id("msg")

    def output(self, text: str) -> list[dict]:
        """The answer's output items: its call, or its message."""
        call = tool_calls.parse_call(text, self.functions) if self.functions else None
        if call is not None:
            return [self.call_item(*call)]
        return [self.message_item(text)]

    def message_item(self, text: str | None, status: str = "completed") -> dict:
        content = [] if text is None else [self.text_part(text)]
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": content}

    @staticmethod
    def text_part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def call_item(self, name: str, arguments: dict) -> dict:
        return {"type": "function_call", "id": _new_id("fc"), "call_id": _new_id("call"),
                "name": name, "arguments": json.dumps(arguments), "status": "completed"}

    def response(self, output: list[dict], reply: Reply | None = None,
                 status: str | None = None, error: dict | None = None) -> dict:
        """The response object; reply: the finished answer (its status and usage), else
        `status` (in_progress, failed)."""
        incomplete = None
        if reply is not None:
            ended_by_length = reply.finish == "length"
            status = "incomplete" if ended_by_length else "completed"
            incomplete = {"reason": "max_output_tokens"} if ended_by_length else None
        body, params = self.body, self.params
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": error, "incomplete_details": incomplete,
            "model": self.model, "output": output,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": params.temperature, "top_p": params.top_p,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "text": body.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "store": False, "background": False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "metadata": body.get("metadata") or {}, "user": body.get("user"),
            "service_tier": "default",
            "usage": _usage(reply) if reply is not None else None,
        }


def _usage(reply: Reply) -> dict:
    stats = reply.usage_stats()
    return {"input_tokens": stats.prompt_positions,
            "input_tokens_details": {"cached_tokens": stats.reused_positions},
            "output_tokens": stats.generated_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": stats.prompt_positions + stats.generated_tokens}


async def _events(request: Request, server: Server, shape: ResponseShape, reply: Reply, first):
    """The typed events, each `event: TYPE` + `data: {..., "type", "sequence_number"}`. A text
    that may be a call (tools offered and it begins with "{") is held to its end, then sent as a
    function_call item (its arguments in one delta) or, when it is not a call, as a message."""
    sequence = 0

    def sent(kind: str, **data) -> str:
        nonlocal sequence
        text = json.dumps({"type": kind, "sequence_number": sequence, **data},
                          ensure_ascii=False, separators=(",", ":"))
        sequence += 1
        return f"event: {kind}\ndata: {text}\n\n"

    yield sent("response.created", response=shape.response([], status="in_progress"))
    yield sent("response.in_progress", response=shape.response([], status="in_progress"))
    where = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
    held, shown = tool_calls.HeldCall(shape.functions), []

    def opening() -> list[str]:  # the message item and its text part, before its first delta
        return [sent("response.output_item.added", output_index=0,
                     item=shape.message_item(None, "in_progress")),
                sent("response.content_part.added", **where, part=shape.text_part(""))]

    text = first
    try:
        while True:
            if text and not held.hold(text):
                if not shown:
                    for line in opening():
                        yield line
                shown.append(text)
                yield sent("response.output_text.delta", **where, delta=text, logprobs=[])
            if reply.finish is not None:
                break
            if await request.is_disconnected():
                return
            text = await reply.next()
    except Owl2Error as e:
        await close_all([reply])
        server.metrics.stream_errors += 1
        error = error_body(400, str(e), code="grammar_error" if isinstance(e, GrammarError)
                           else "server_error")["error"]
        yield sent("error", code=error["code"], message=error["message"],
                   param=getattr(e, "param", None))
        yield sent("response.failed", response=shape.response(
            [], status="failed", error={"code": error["code"], "message": error["message"]}))
        return
    await close_all([reply])
    call = held.end()
    if call is not None:
        item = shape.call_item(*call)
        where_call = {"item_id": item["id"], "output_index": 0}
        yield sent("response.output_item.added", output_index=0,
                   item={**item, "arguments": "", "status": "in_progress"})
        yield sent("response.function_call_arguments.delta", **where_call,
                   delta=item["arguments"])
        yield sent("response.function_call_arguments.done", **where_call,
                   arguments=item["arguments"], name=item["name"])
        yield sent("response.output_item.done", output_index=0, item=item)
    else:
        if not shown:
            for line in opening():
                yield line
        if held.text:  # a text that looked like a call and was not (cut short)
            shown.append(held.text)
            yield sent("response.output_text.delta", **where, delta=held.text, logprobs=[])
        whole = "".join(shown)
        yield sent("response.output_text.done", **where, text=whole, logprobs=[])
        yield sent("response.content_part.done", **where, part=shape.text_part(whole))
        item = shape.message_item(whole)
        yield sent("response.output_item.done", output_index=0, item=item)
    final = shape.response([item], reply)
    yield sent("response.incomplete" if final["status"] == "incomplete" else
               "response.completed", response=final)


__all__ = ["create", "ResponseShape"]
