"""The fields of an OpenAI request body -> what Owl2 takes: SamplingParams, stop strings, the
stream flag, n. Which fields each route reads, and what each does, is field_table.py's one
table. No field is accepted and ignored: a field of the wrong type or out of range is a 400
naming it, a field this server does not implement is one unless its value asks for nothing, and
so is any field it does not know."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from owl2_edge.errors import ArgumentError
from owl2_edge.sampling import SamplingParams
from owl2_edge.serve import field_table
from owl2_edge.serve.field_table import CHAT, COMPLETIONS
from owl2_edge.serve.limits import Limits, bad_request

# Request name -> SamplingParams field, for the fields passed as they are (field_table.py);
# max_tokens, seed and logprobs are read on their own.
_SETS = {**field_table.sampling(CHAT), **field_table.sampling(COMPLETIONS)}
# Answers one request may ask for (n): each takes a slot of the engine.
MAX_CHOICES = 8
# /v1/completions' logprobs: how many alternatives (0..5), as OpenAI's legacy endpoint.
MAX_COMPLETION_LOGPROBS = 5


def check_known(body: dict, route: str) -> None:
    known = field_table.of(route)
    for name in body:
        if name not in known:
            raise bad_request(f"unknown field {name!r}: this server does not act on it (the "
                              f"fields it takes: GET /props, supported_fields)", param=name,
                              code="unknown_field")


def check_not_implemented(body: dict, route: str) -> None:
    for name, field in field_table.of(route).items():
        if field.neutral is not None and name in body and not field.neutral(body[name]):
            raise bad_request(f"{name} is not supported by this server (accepted only as "
                              f"{field.text})", param=name, code="unsupported_field")


def default_sampling() -> dict:
    """The sampling a request gets for the fields it leaves out: SamplingParams' defaults
    (upstream's CLI: temperature 0.2, top_k 50), as `owl2 ask`."""
    return {f.name: f.default for f in fields(SamplingParams)}


@dataclass(frozen=True)
class Request:
    params: SamplingParams
    stream: bool
    include_usage: bool = False  # stream_options.include_usage
    n: int = 1                   # answers (choices) to the one prompt
    timings_per_token: bool = False  # llama-server's: each streamed chunk carries `timings`


def choice_params(asked: Request) -> list[SamplingParams]:
    """Each choice's sampling: with a seed, seed, seed + 1, ... (distinct and reproducible);
    without, each its own random draws. Greedy choices are all the same answer, as OpenAI's."""
    if asked.params.seed is None:
        return [asked.params] * asked.n
    return [replace(asked.params, seed=(asked.params.seed + k) % 2**64) for k in range(asked.n)]


def parse(body: dict, limits: Limits, completions: bool = False) -> Request:
    """The fields both endpoints share; `completions`: /v1/completions, whose logprobs is a
    count of alternatives rather than chat's flag."""
    n = _choices(body)
    route = COMPLETIONS if completions else CHAT
    check_known(body, route)
    check_not_implemented(body, route)
    stream = flag(body, "stream")
    check_metadata(body.get("metadata"))
    return Request(sampling_params(body, limits, completions), stream,
                   include_usage(body, stream), n, flag(body, "timings_per_token"))


def check_metadata(value) -> None:
    """OpenAI's metadata: at most 16 string pairs (keys up to 64 characters, values up to 512);
    kept only with `store`, so here it changes nothing, but a malformed one is still refused."""
    if value is None:
        return
    if (not isinstance(value, dict) or len(value) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64
                       and len(v) <= 512 for k, v in value.items())):
        raise bad_request("metadata must be an object of at most 16 string pairs (keys up to 64 "
                          "characters, values up to 512)", param="metadata")


def _logprobs(body: dict, completions: bool) -> dict:
    """SamplingParams' logprobs and top_logprobs from either endpoint's fields."""
    if completions:
        count = body.get("logprobs")
        if count is None:
            return {}
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 0 <= count <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} "
                              f"on /v1/completions", param="logprobs")
        return {"logprobs": True, "top_logprobs": count}
    chosen = {}
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) is not None:
            chosen[name] = body[name]
    return chosen


def include_usage(body: dict, stream: bool) -> bool:
    """stream_options: {"include_usage": bool}, only with stream: true (as OpenAI)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed with stream: true",
                          param="stream_options")
    if not isinstance(options, dict):
        raise bad_request(f"stream_options must be an object, not {type(options).__name__}",
                          param="stream_options")
    return flag(options, "include_usage", param="stream_options.include_usage")


def sampling_params(body: dict, limits: Limits, completions: bool = False) -> SamplingParams:
    chosen = _logprobs(body, completions)
    for name, field in _SETS.items():
        if body.get(name) is not None:
            chosen[field] = body[name]
    seed = body.get("seed")
    if seed is not None and seed != -1:  # -1: a random seed, as llama-server
        chosen["seed"] = seed
    param, max_tokens = "max_completion_tokens", body.get("max_completion_tokens")
    if max_tokens is None:
        param, max_tokens = "max_tokens", body.get("max_tokens")
    if max_tokens is not None:
        chosen["max_tokens"] = max_tokens
    # Each field on its own first, so that the 400 names the field at fault.
    names = {v: k for k, v in _SETS.items()} | {"seed": "seed", "max_tokens": param} | \
        {name: name for name in ("logprobs", "top_logprobs")}
    for field, value in chosen.items():
        try:  # (top_logprobs is judged beside logprobs, below)
            SamplingParams(**{field: value, **({"logprobs": True} if field == "top_logprobs"
                                               else {})})
        except ArgumentError as e:
            raise bad_request(str(e).replace(field, names[field], 1),
                              param=e.param or names[field]) from None
    try:
        params = SamplingParams(**{"max_tokens": min(SamplingParams.max_tokens, limits.max_tokens),
                                   **chosen})
    except ArgumentError as e:  # fields that cannot go together (a grammar and ignore_eos)
        raise bad_request(str(e), param=getattr(e, "param", None)) from None
    if params.max_tokens > limits.max_tokens:
        raise bad_request(f"{param} is {params.max_tokens}; this server allows at most "
                          f"{limits.max_tokens} (owl2 serve --max-tokens-limit)", param=param,
                          code="max_tokens_too_large")
    return params


def flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        param = param or name
        raise bad_request(f"{param} must be true or false, not {type(value).__name__}",
                          param=param)
    return value


def _choices(body: dict) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"n must be an integer from 1 to {MAX_CHOICES} (answers to the one "
                          f"prompt, decoded together)", param="n")
    return n


def required(body: dict, name: str, kind: type, what: str):
    value = body.get(name)
    if value is None:
        raise bad_request(f"{name} is required ({what})", param=name)
    if not isinstance(value, kind):
        raise bad_request(f"{name} must be {what}, not {type(value).__name__}", param=name)
    return value


def prompt_text(body: dict) -> str:
    """/v1/completions' prompt: a string, or a list holding one string."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("prompt is required (a string; <|image|> marks each image's place)",
                          param="prompt")
    if not isinstance(prompt, str):
        raise bad_request("prompt must be one string (token ids and batches are not taken)",
                          param="prompt")
    return prompt


def image_list(body: dict, name: str = "images") -> list:
    images = body.get(name)
    if images is None:
        return []
    if not isinstance(images, list):
        raise bad_request(f"{name} must be a list of image urls (data:, base64, file://, "
                          f"http(s)://)", param=name)
    return images
