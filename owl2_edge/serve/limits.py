"""What `owl2 serve` accepts, and how it refuses the rest: the limits, OpenAI's error shape, and
reading a request's JSON body within its size limit. (No Starlette import: the CLI reads the
limits' defaults from here without loading the server.)"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import orjson

from owl2_edge import checks

if TYPE_CHECKING:
    from starlette.requests import Request

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_queue: int = 16                  # requests waiting behind the one being answered
    max_body_bytes: int = 32 * MiB       # a request's JSON body (base64 images included)
    max_images: int = 8                  # images per request
    max_tokens: int = 4096               # the largest max_tokens a request may ask for
    max_image_bytes: int = 20 * MiB      # one image file, after base64 decoding
    # The pixels of one image, read from its header before it is decoded: decoding is where a
    # small file (a PNG of one colour) becomes gigabytes. 50 MP is a large phone photo.
    max_image_pixels: int = 50_000_000
    remote_timeout_s: float = 10.0       # the whole download of one http(s) image
    # A request's whole time: its body, its images, its wait for the model and its answer. Past
    # it a request still reading or waiting is refused (408, 503) and an answer ends where it is
    # (finish_reason "length"). llama-server's --timeout default.
    request_timeout_s: float = 600.0

    def __post_init__(self):
        checks.integer("max_queue", self.max_queue, 0, 1 << 16)
        checks.integer("max_body_bytes", self.max_body_bytes, 1024, 1 << 40)
        checks.integer("max_images", self.max_images, 0, 4096)
        checks.integer("max_tokens", self.max_tokens, 1, 1 << 20)
        checks.integer("max_image_bytes", self.max_image_bytes, 1, 1 << 40)
        checks.integer("max_image_pixels", self.max_image_pixels, 1, 1 << 40)
        checks.number("remote_timeout_s", self.remote_timeout_s, 0, 3600, lo_open=True)
        checks.number("request_timeout_s", self.request_timeout_s, 0, 7 * 24 * 3600,
                      lo_open=True)

    def to_dict(self) -> dict:
        return asdict(self)


# OpenAI's error "type" for each status this server answers with.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "timeout_error"}


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # e.g. a 429's Retry-After

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None
               ) -> dict:
    """{"error": {"message", "type", "param", "code"}}, as the OpenAI API and llama-server send."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


async def read_json(request: Request, max_bytes: int, max_values: int) -> dict:
    """The body as a JSON object; 413 beyond max_bytes (read no further), 400 if not JSON or if
    it holds more than max_values values (counted before parsing, see json_values)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        request.state.body_bytes = len(body)  # memory.py: a large body is followed by a trim
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    values = json_values(body)
    if values > max_values:
        raise bad_request(f"the body holds about {values:,} JSON values; this server takes at "
                          f"most {max_values:,} (what the longest prompt that fits the context "
                          f"needs)", code="too_many_values")
    try:
        data = parse_json(body)
    except RecursionError:
        raise bad_request("the body is JSON nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
        raise bad_request(f"the body is not JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, not {type(data).__name__}",
                          code="invalid_json")
    return data


def parse_json(body: bytes):
    """The body's JSON value. orjson where it reads JSON as Python's json does: the event loop
    parses each body between other clients' work, and on a large string-heavy one (a 250 KB
    grammar) orjson and the digit check below take 0.5 ms where Python's json takes 1.4. orjson
    makes an integer beyond 64 bits a float (a schema's `const` would change) and refuses lone
    surrogates: a body with a run of 19 digits anywhere, or one orjson refuses, goes to
    Python's json, which reads it or says why it is not JSON."""
    if _LONG_INTEGER not in body.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_refuse_constant)


# parse_json's check, at memory speed: every digit made "0", everything else " ", then one
# search for 19 of them in a row (2**63 has 19 digits).
_DIGITS_AS_ZERO = bytes(b"0"[0] if chr(i).isdigit() and i < 128 else b" "[0] for i in range(256))
_LONG_INTEGER = b"0" * 19


def json_values(body: bytes) -> int:
    """An upper bound on the values a JSON text holds, in three scans at memory speed: each
    value after the first in an array or an object follows a comma, and each array and object
    opens with a bracket (commas and brackets inside strings only make it larger). Parsing is
    where a body of 32 MiB becomes seconds of work and a gigabyte of objects ([1,1,1,...] or
    [{},{},...]); the count refuses such a body before it is parsed."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server takes "
                         f"({max_bytes / MiB:g} MiB; owl2 serve --max-body-mb)",
                    code="body_too_large")


def _refuse_constant(name: str):
    # Python's json reads NaN and Infinity, which JSON does not have.
    raise ValueError(f"{name} is not JSON")
