"""Every request field of the OpenAI-shaped routes, declared once: where it is read, what it sets,
and what it does here (what /props lists). fields.py (chat and completions) and responses.py
read their bodies through this table; ollama's API, whose names are its own (`options.*`),
keeps its table in ollama.py.

A field is one of:
- read by its route (the input, the output form, the token budget, tools): `sets` None;
- a SamplingParams field of the same meaning, passed as given: `sets` names it;
- taken and changing nothing here (`user`, `metadata`): `taken`;
- accepted only with a value that asks for nothing (`store: false`, `echo: false`): `neutral`
  is its test, and `text` says which values and why. Any other value is a 400 naming it.
Any name not in the table for a route is refused as unknown (a typo such as "temprature" would
otherwise be answered as if it were not there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CHAT, COMPLETIONS, RESPONSES = "chat", "completions", "responses"
OPENAI = (CHAT, COMPLETIONS)
EVERY = (CHAT, COMPLETIONS, RESPONSES)


@dataclass(frozen=True)
class Field:
    name: str
    routes: tuple[str, ...]
    text: str
    sets: str | None = None                       # the SamplingParams field it sets as given
    neutral: Callable[[object], bool] | None = None   # accepted only where this holds
    taken: bool = False                           # accepted, changes nothing


def _only(*values) -> Callable[[object], bool]:
    """None, or one of `values` (of the same type: True is not 1)."""
    return lambda value: value is None or any(value == v and type(value) is type(v)
                                              for v in values)


def _never(value) -> bool:
    return value is None


def _sampling(name: str, text: str, routes=EVERY) -> Field:
    return Field(name, routes, text, sets=name)


FIELDS: tuple[Field, ...] = (
    # The input.
    Field("messages", (CHAT,), "text, image_url, video_url and input_video parts; tool calls and "
                               "tool results"),
    Field("prompt", (COMPLETIONS,), "one string; <|image|> marks each image's place"),
    Field("images", (COMPLETIONS,), "the prompt's images in order (data:, base64, file://, http(s))"),
    Field("input", (RESPONSES,), "a string, or message, function_call and function_call_output "
                                 "items; input_text and input_image parts"),
    Field("instructions", (RESPONSES,), "the system text"),
    Field("model", EVERY, "any name: this server's one model answers"),
    # The output's form and budget.
    Field("stream", EVERY, "server-sent events"),
    Field("stream_options", OPENAI, "include_usage"),
    Field("n", OPENAI, "1..8 answers to the one prompt, decoded together"),
    Field("timings_per_token", OPENAI, "llama-server's: each streamed chunk carries timings"),
    Field("logprobs", (CHAT,), "the answer's tokens' log probabilities"),
    Field("top_logprobs", (CHAT,), "0..20 alternatives per token"),
    Field("logprobs", (COMPLETIONS,), "0..5 alternatives per token"),
    Field("max_tokens", OPENAI, "the answer's token budget"),
    Field("max_completion_tokens", OPENAI, "the answer's token budget (OpenAI's newer name)"),
    Field("max_output_tokens", (RESPONSES,), "the answer's token budget"),
    Field("seed", EVERY, "reproducible sampling (-1: random, as llama-server)"),
    # Sampling, as SamplingParams takes it.
    _sampling("temperature", "0: greedy"),
    _sampling("top_p", "nucleus sampling"),
    _sampling("top_k", "llama-server's"),
    _sampling("min_p", "llama-server's"),
    _sampling("repeat_penalty", "llama-server's"),
    _sampling("repeat_last_n", "llama-server's"),
    _sampling("ignore_eos", "llama-server's"),
    _sampling("frequency_penalty", "OpenAI's"),
    _sampling("presence_penalty", "OpenAI's"),
    _sampling("logit_bias", "token id -> bias"),
    _sampling("stop", "stop strings: decoding ends at once"),
    # Constraints (owl2_edge/constrain.py), passed as they are.
    _sampling("response_format", "text, json_object (with llama-server's schema), json_schema",
              OPENAI),
    _sampling("json_schema", "llama-server's: a JSON schema"),
    _sampling("grammar", "llama-server's: GBNF, or Lark"),
    Field("text", (RESPONSES,), "format: text, json_object, json_schema"),
    Field("tools", (CHAT, RESPONSES), "function tools, through the grammar (tool_calls.py)"),
    Field("tool_choice", (CHAT, RESPONSES), "none, auto, required, a function"),
    # Taken, changing nothing.
    Field("user", EVERY, "taken: identifies the end user to OpenAI; kept nowhere", taken=True),
    Field("metadata", EVERY, "taken: kept only with store, so it changes nothing", taken=True),
    Field("safety_identifier", (RESPONSES,), "taken, as user", taken=True),
    Field("prompt_cache_key", (RESPONSES,), "taken: caching here is by content", taken=True),
    # Accepted only with a value that asks for nothing.
    Field("store", EVERY, "false: nothing is stored", neutral=_only(False)),
    Field("service_tier", EVERY, '"auto" or "default": one tier',
          neutral=_only("auto", "default")),
    Field("parallel_tool_calls", EVERY, "true or false: an answer makes one call at most "
                                        "(tool_calls.py)", neutral=_only(True, False)),
    Field("functions", OPENAI, "[]: OpenAI's older form of tools; give tools and tool_choice",
          neutral=_only([])),
    Field("function_call", OPENAI, '"none" or "auto" (give tool_choice)',
          neutral=_only("none", "auto")),
    Field("echo", OPENAI, "false: the prompt is not echoed", neutral=_only(False)),
    Field("suffix", OPENAI, '"": no insertion after the answer', neutral=_only("")),
    Field("best_of", OPENAI, "1: one answer is made per request", neutral=_only(1)),
    Field("modalities", OPENAI, '["text"]: answers are text', neutral=_only(["text"])),
    Field("audio", OPENAI, "absent: no audio", neutral=_never),
    Field("prediction", OPENAI, "absent: no predicted outputs", neutral=_never),
    Field("background", (RESPONSES,), "false: an answer is made while the request waits",
          neutral=_only(False)),
    Field("truncation", (RESPONSES,), '"disabled": a prompt that does not fit is refused, '
                                      "never cut", neutral=_only("disabled")),
    Field("reasoning", (RESPONSES,), "{}: this model does not reason apart from its answer",
          neutral=lambda v: v in (None, {}, {"effort": None})),
    Field("include", (RESPONSES,), "[]: no extra output items", neutral=_only([])),
    Field("max_tool_calls", (RESPONSES,), "at least 1: an answer makes one call at most",
          neutral=lambda v: v is None or (type(v) is int and v >= 1)),
    Field("top_logprobs", (RESPONSES,), "0: log probabilities are offered on "
                                        "/v1/chat/completions", neutral=_only(0)),
    Field("previous_response_id", (RESPONSES,), "absent: responses are not stored here; send "
                                                "the conversation in input", neutral=_never),
    Field("conversation", (RESPONSES,), "absent: conversations are not stored here; send them "
                                        "in input", neutral=_never),
    Field("prompt", (RESPONSES,), "absent: stored prompt templates are OpenAI's",
          neutral=_never),
)


def of(route: str) -> dict[str, Field]:
    """The fields a route reads, by name."""
    return {f.name: f for f in FIELDS if route in f.routes}


def sampling(route: str) -> dict[str, str]:
    """Request name -> SamplingParams field, for the fields passed as they are."""
    return {f.name: f.sets for f in FIELDS if route in f.routes and f.sets}


def acted_on(routes=OPENAI) -> list[str]:
    """/props' supported_fields: each field these routes act on or take, with what it does."""
    seen, out = set(), []
    for f in FIELDS:
        if f.neutral is None and set(routes) & set(f.routes) and f.name not in seen:
            seen.add(f.name)
            out.append(f"{f.name}: {f.text}")
    return out


def accepted_only_as(routes=OPENAI) -> dict[str, str]:
    """/props' unsupported_fields: each field taken only with a value that asks for nothing."""
    return {f.name: "accepted only as " + f.text for f in FIELDS
            if f.neutral is not None and set(routes) & set(f.routes)}


__all__ = ["CHAT", "COMPLETIONS", "EVERY", "FIELDS", "Field", "OPENAI", "RESPONSES",
           "accepted_only_as", "acted_on", "of", "sampling"]
