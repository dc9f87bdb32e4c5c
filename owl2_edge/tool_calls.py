"""Tool calls for any model, through the grammar (docs/clients.md, "Tool calls").

The functions an app offers go into the prompt in the one form the demo model was trained on
(prompt.tools_text: a system text put first in the first question), and the answer is held by a
grammar to what tool_choice allows:

    "auto"      a call, or a plain reply (which then cannot begin with "{")
    "required"  a call of one of the functions
    a function  a call of that function
    "none"      anything (no grammar: the functions are still shown, as OpenAI does)

A call is one JSON object, {"name": ..., "arguments": {...}} (prompt.tool_call_text), whose
arguments follow that function's `parameters` schema, in the grammar engine's JSON layout. One
call per answer: a model trained on one call per answer (the demo's form) makes one; asking for
none in parallel (`parallel_tool_calls: false`) changes nothing. The grammar guarantees the
form, not the judgement: a model that was not trained for tools calls them as well as it can.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from owl2_edge.constrain import JSON_LAYOUT
from owl2_edge.errors import ArgumentError, GrammarError

if TYPE_CHECKING:
    from owl2_edge.sampling import SamplingParams

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHOICES = ("none", "auto", "required")


def functions_of(tools, field: str = "tools") -> list[dict]:
    """OpenAI's tools ([{"type": "function", "function": {"name", "description",
    "parameters"}}]) -> the functions, checked: [{"name", "description", "parameters"}]."""
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise GrammarError(f"{field} must be a list of 1 to {MAX_TOOLS} tools", field)
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise GrammarError(f'{where} must be {{"type": "function", "function": {{...}}}} '
                               f"(function tools only)", field)
        function = tool["function"]
        name, parameters = function.get("name"), function.get("parameters",
                                                                {"type": "object"})
        if not isinstance(name, str) or not _NAME.match(name) or name in seen:
            raise GrammarError(f"{where}.function.name must be 1-64 letters, digits, _ or -, "
                               f"each name once", field)
        if not isinstance(parameters, dict):
            raise GrammarError(f"{where}.function.parameters must be a JSON schema object",
                               field)
        description = function.get("description", "")
        if not isinstance(description, str):
            raise GrammarError(f"{where}.function.description must be a string", field)
        seen.add(name)
        functions.append({"name": name, "description": description, "parameters": parameters})
    return functions


def chosen(functions: list[dict], tool_choice, field: str = "tool_choice") -> tuple[str, list]:
    """tool_choice -> ("none" | "auto" | "required", the functions it may call)."""
    if tool_choice is None:
        return "auto", functions
    if tool_choice in CHOICES:
        return tool_choice, functions
    name = (tool_choice.get("function") or {}).get("name") \
        if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" else None
    named = [f for f in functions if f["name"] == name]
    if not named:
        raise GrammarError(f'{field} must be "none", "auto", "required" or {{"type": '
                           f'"function", "function": {{"name": ...}}}} naming one of the tools',
                           field)
    return "required", named


def grammar(mode: str, functions: list[dict]) -> str | None:
    """The Lark grammar (llguidance's, with its %json) an answer follows, or None ("none")."""
    if mode == "none":
        return None
    definitions: dict = {}
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                               "arguments": _lifted(f["parameters"], k,
                                                                    definitions)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for k, f in enumerate(functions)]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if definitions:
        call = {**call, "$defs": definitions}
    lines = [f"call: %json {json.dumps({**call, 'x-guidance': JSON_LAYOUT})}"]
    if mode == "auto":
        # A reply is any text that does not begin as a call does.
        return "\n".join(["start: call | reply", *lines, r"reply: /[^{\s][\s\S]*/"])
    return "\n".join(["start: call", *lines])


def _lifted(parameters: dict, k: int, definitions: dict) -> dict:
    """Function k's parameters schema, placed inside the call's schema: its own definitions
    ($defs, or the older `definitions`) moved to the call's top as f{k}_NAME, and every local
    $ref rewritten to where its target now is ("#/$defs/X" -> "#/$defs/f{k}_X"; "#" or
    "#/properties/..." -> into the copy of the whole schema at "#/$defs/f{k}"). Pydantic's and
    zod's schemas use $defs for every nested model; left in place, their refs point nowhere."""
    def rewrite(node):
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = _moved_ref(value, k)
            else:
                out[key] = rewrite(value)
        return out
    own = {}
    for key in ("$defs", "definitions"):
        if isinstance(parameters.get(key), dict):
            own.update(parameters[key])
    if not own and not _has_local_ref(parameters):
        return parameters
    for name, schema in own.items():
        definitions[f"f{k}_{name}"] = rewrite(schema)
    body = rewrite({key: v for key, v in parameters.items() if key not in ("$defs", "definitions")})
    definitions[f"f{k}"] = body
    return {"$ref": f"#/$defs/f{k}"}


def _moved_ref(ref: str, k: int) -> str:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            return f"#/$defs/f{k}_" + ref[len(prefix):]
    return f"#/$defs/f{k}" + ref[1:]


def _has_local_ref(node) -> bool:
    if isinstance(node, dict):
        return any((key == "$ref" and isinstance(v, str) and v.startswith("#"))
                   or _has_local_ref(v) for key, v in node.items())
    if isinstance(node, list):
        return any(_has_local_ref(v) for v in node)
    return False


def offer(tools, tool_choice, params: "SamplingParams"
          ) -> tuple[list[dict] | None, tuple[str, list[dict]] | None, "SamplingParams"]:
    """OpenAI's tools and tool_choice, as any caller gives them (the API, every route) ->
    (the functions to show in the prompt, (tool_choice's mode, the functions an answer may
    call) when it may call one, params with the calls' grammar). ArgumentError (GrammarError
    for the tools themselves) naming the field at fault."""
    if tools in (None, []):
        if tool_choice not in (None, "none", "auto"):
            raise ArgumentError("tool_choice names a tool but no tools are given",
                                "tool_choice")
        return None, None, params
    functions = functions_of(tools)
    mode, callable_ = chosen(functions, tool_choice)
    if mode == "none":
        return functions, None, params
    if params.constraint is not None:
        raise ArgumentError(f"tools cannot be combined with {params.constraint.field}: an "
                            f"answer follows one grammar", "tools")
    return functions, (mode, callable_), replace(params, grammar=grammar(mode, callable_))


class HeldCall:
    """A streamed answer that may be a call: its text is held from a first "{" to the end (a
    call's arguments go out whole, as one delta), then it is the call, or when it turned out
    not to be one (cut by max_tokens) the text as it was. functions: those it may call."""

    def __init__(self, functions: list[dict] | None):
        self.functions = functions
        self.text: str | None = None  # held so far (None: nothing held)
        self._begun = False           # text already went out: not a call

    def hold(self, text: str) -> bool:
        """True when `text` is held (the caller sends nothing for it now)."""
        if not text:
            return self.text is not None
        if self.text is not None or (self.functions and not self._begun
                                     and text.lstrip().startswith("{")):
            self.text = (self.text or "") + text
            return True
        self._begun = True
        return False

    def end(self) -> tuple[str, dict] | None:
        """At the answer's end: (name, arguments) when the held text is a call, else None
        (then self.text, if not None, is text still to send)."""
        if self.text is None:
            return None
        call = parse_call(self.text, self.functions)
        if call is not None:
            self.text = None
        return call


def parse_call(text: str, functions: list[dict]) -> tuple[str, dict] | None:
    """(name, arguments) when `text` is a call of one of the functions, else None (a reply)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    names = {f["name"] for f in functions}
    if isinstance(value, dict) and value.get("name") in names and \
            isinstance(value.get("arguments"), dict) and set(value) == {"name", "arguments"}:
        return value["name"], value["arguments"]
    return None


__all__ = ["CHOICES", "MAX_TOOLS", "chosen", "functions_of", "grammar", "offer", "parse_call",
           "HeldCall"]
