"""The routes of `owl2 serve`: an OpenAI-compatible API over one Owl2 (docs/design.md §13).

    POST /v1/chat/completions   messages with text, image_url and video parts; stream: server-sent events
    POST /v1/completions        a raw prompt with <|image|> marks and an `images` list
    POST /v1/responses          OpenAI's Responses API (responses.py); /responses too
    POST /v1/warm               pictures read ahead while the question is typed (warm.py)
    /api/...                    ollama's API (ollama.py)
    GET  /v1/models  /health  /props  /metrics  /   (the chat page)

Before any route, origin.py refuses Host names and web origins the server does not answer
to. Each handler reads and checks the request here, on the event loop (cheap, and bounded before
it is parsed); then, on a worker thread, refuses a prompt too long for the context from its
length alone, reads its images and tokenizes it (Owl2.prepare), so that the model thread never
spends time on a request it would refuse, and compiles its grammar (within constraint_bounds'
BOUNDS); then its answer joins the engine's (admission.py bounds the requests let in,
answer.py's Reply reads each choice's answer). Everything a request does counts against its
time limit.
Every refusal is OpenAI's error object (limits.py).
"""

from __future__ import annotations

import functools
import hmac
import importlib.util
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from owl2_edge import clips, openai_chat, tool_calls
from owl2_edge.constraint_bounds import BOUNDS
from owl2_edge.errors import (ArgumentError, ContextFullError, GrammarError, ImageError,
                              Owl2Error, PromptError)
from owl2_edge.serve import field_table, fields, memory, ollama, responses, warm
from owl2_edge.serve.answer import ClientGone, Reply
from owl2_edge.serve.answering import (AnswerStream, check_image_count, close_all,
                                       prepare_messages, prepare_request, read_body,
                                       start_choices, start_compiler)
from owl2_edge.serve.fetch import Fetcher, IpNetwork
from owl2_edge.serve.images import ImageReader, count_image_parts
from owl2_edge.serve.limits import ApiError, Limits, error_body
from owl2_edge.serve.metrics import CountingMiddleware, Metrics
from owl2_edge.serve.origin import BrowserGuard
from owl2_edge.serve.prometheus import CONTENT_TYPE as PROMETHEUS_TYPE
from owl2_edge.serve.admission import Admission
from owl2_edge.serve.shapes import DONE, ChatShape, TextShape, event

if TYPE_CHECKING:
    from owl2_edge.owl2 import Owl2, Prepared

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("owl2_edge.serve")

# Errors that the request caused: 400 with their message. Any other Owl2Error (a damaged model
# file, NaN logits) is the server's own failure: 500.
_REQUEST_ERRORS = (ArgumentError, ContextFullError, ImageError, PromptError)
# A body may hold this many JSON values beyond the prompt's characters (the structure around
# them: messages, parts, fields): see limits.json_values.
_JSON_STRUCTURE_VALUES = 65536


@dataclass
class Server:
    """What the routes share: the one model and everything around it."""
    owl: Owl2
    limits: Limits
    reader: ImageReader
    queue: Admission
    metrics: Metrics
    api_key: str | None
    started: int
    host_allow: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    warms: deque = field(default_factory=deque)  # the warms going (warm.py bounds them)

    @property
    def model_id(self) -> str:
        return self.owl.folder.name

    @property
    def max_json_values(self) -> int:
        """The most values a request body may hold: every character of the longest prompt that
        could fit, as its own value, and the structure around them."""
        return self.owl.max_prompt_chars() + _JSON_STRUCTURE_VALUES

    def deadline(self) -> float:
        """A request starting now must be done by this time.monotonic() time."""
        return time.monotonic() + self.limits.request_timeout_s


def create_app(owl: Owl2, limits: Limits | None = None, api_key: str | None = None,
               allow_paths: Sequence[str | Path] = (), allow_remote_images: bool = False,
               allow_networks: Sequence[IpNetwork] = (), host_allow: Sequence[str] = (),
               cors_origins: Sequence[str] = (), fetcher: Fetcher | None = None) -> Starlette:
    """The ASGI app over a loaded Owl2 (app.state.server holds what the routes share).
    allow_networks: networks that remote images may come from besides public addresses;
    host_allow, cors_origins: see origin.py; fetcher: the remote images' downloader, when not
    the one these options make (tests give one with a stub name resolver)."""
    limits = limits or Limits()
    metrics = Metrics()
    memory.map_large_blocks()
    start_compiler()
    if allow_remote_images and fetcher is None:
        fetcher = Fetcher(limits.max_image_bytes, limits.remote_timeout_s, allow_networks)
    reader = ImageReader(limits, tuple(Path(p) for p in allow_paths),
                         fetcher if allow_remote_images else None)
    server = Server(owl, limits, reader, Admission(owl, limits.max_queue, metrics), metrics,
                    api_key or None, int(time.time()), tuple(host_allow), tuple(cors_origins))
    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/v1/models", models),
        Route("/props", props),
        Route("/metrics", metrics_route),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        # OpenAI's Responses API (responses.py), also where llama-server mirrors it.
        Route("/v1/responses", api()(responses.create), methods=["POST"]),
        Route("/responses", api()(responses.create), methods=["POST"]),
        # Pictures read ahead while a question is typed (warm.py): owl2-edge's own.
        Route("/v1/warm", api()(warm.warm), methods=["POST"]),
        # ollama's API (ollama.py): its routes, its error shape.
        *(Route(path, api(errors=ollama.error_body)(handler), methods=[method])
          for path, handler, method in (
              ("/api/chat", ollama.chat, "POST"), ("/api/generate", ollama.generate, "POST"),
              ("/api/show", ollama.show, "POST"), ("/api/tags", ollama.tags, "GET"),
              ("/api/ps", ollama.ps, "GET"), ("/api/version", ollama.version, "GET"))),
    ]
    app = Starlette(routes=routes,
                    middleware=[Middleware(CountingMiddleware, metrics=metrics),
                                Middleware(BrowserGuard, host_allow=server.host_allow,
                                           cors_origins=server.cors_origins)],
                    exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app


def api(auth: bool = True, errors: Callable[[ApiError], dict] | None = None):
    """A route that answers errors in OpenAI's shape (or as `errors` writes an ApiError: ollama's
    routes) and, with an API key set, checks it."""
    def decorate(handler):
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            response = await _handle(request)
            if getattr(request.state, "body_bytes", 0) >= memory.LARGE_BODY_BYTES:
                # Once the response is out (an answer's stream too), give the memory back.
                response.background = _then(response.background, memory.give_back)
            return response

        async def _handle(request: Request) -> Response:
            server: Server = request.app.state.server
            try:
                if auth and server.api_key is not None:
                    _check_key(request, server.api_key)
                return await handler(request, server)
            except ApiError as e:
                return _error_response(e, errors)
            except ClientDisconnect:  # gone while its body was read: nobody reads a reply
                return Response(status_code=499)
            except _REQUEST_ERRORS as e:  # a GrammarError names its field (param)
                return _error_response(ApiError(400, str(e), getattr(e, "param", None),
                                                code=_code(e)), errors)
            except Owl2Error as e:
                log.error("%s", e)
                return _error_response(ApiError(500, str(e), code=_code(e)), errors)
            except Exception as e:  # a bug: one line to the client, the traceback to the log
                log.exception("error in %s", request.url.path)
                message = " ".join(f"internal error: {type(e).__name__}: {e}".split())
                return _error_response(ApiError(500, message), errors)
        return route
    return decorate


def _then(first: BackgroundTask | None, fn) -> BackgroundTask:
    if first is None:
        return BackgroundTask(fn)
    tasks = BackgroundTasks()
    tasks.add_task(first.func, *first.args, **first.kwargs)
    tasks.add_task(fn)
    return tasks


def _error_response(e: ApiError, errors: Callable[[ApiError], dict] | None = None
                    ) -> JSONResponse:
    headers = {**e.headers, **({"WWW-Authenticate": "Bearer"} if e.status == 401 else {})}
    return JSONResponse(errors(e) if errors else e.body(), status_code=e.status, headers=headers)


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "this server needs an API key: Authorization: Bearer KEY",
                       code="missing_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "invalid API key", code="invalid_api_key")


def _code(e: Exception) -> str:
    """ContextFullError -> "context_full_error"."""
    name = type(e).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    # Starlette's own 404 and 405, in OpenAI's shape too.
    message = {404: f"no route {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=exc.headers)


# -- the model's facts and the server's state ------------------------------------------------------

async def page(request: Request) -> Response:
    """The chat page (owl2_edge/serve/static/index.html); no key needed to load it."""
    index = STATIC / "index.html"
    if index.is_file():
        return FileResponse(index, media_type="text/html")
    return JSONResponse(error_body(404, "this installation has no chat page"), status_code=404)


@api(auth=False)
async def health(request: Request, server: Server) -> Response:
    return JSONResponse({"status": "ok"})


@api()
async def models(request: Request, server: Server) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": server.model_id, "object": "model", "created": server.started,
         "owned_by": "owl2-edge"}]})


@api()
async def props(request: Request, server: Server) -> Response:
    owl, limits, queue = server.owl, server.limits, server.queue
    manifest, decoder = owl.manifest, owl.decoder
    defaults = fields.default_sampling()
    defaults["max_tokens"] = min(defaults["max_tokens"], limits.max_tokens)
    # Where the model lives on disk is the user's business: told only to a client with the key.
    path = {"path": str(owl.folder)} if server.api_key else {}
    reader = server.reader
    return JSONResponse({
        "model": {
            "id": server.model_id, **path, "quant": manifest.quant,
            "template": manifest.template, "n_ctx": decoder.n_ctx,
            "n_ctx_train": manifest.decoder.n_ctx_train, "n_vocab": decoder.n_vocab,
            "n_embd": decoder.n_embd, "n_layer": decoder.n_layer,
            "n_visual": manifest.n_visual, "image_size": manifest.image.size,
            "device": decoder.device, "n_threads": decoder.n_threads, "kv_type": decoder.kv_type,
            "flash_attn": decoder.flash_attn, "vision_file": owl.vision.path.name,
            "vision_provider": owl.vision.provider,
        },
        "modalities": {"vision": True},
        "default_generation_settings": defaults,
        "limits": {**limits.to_dict(), "max_prompt_chars": owl.max_prompt_chars(),
                   "max_json_values": server.max_json_values,
                   "file_images": bool(reader.allow_paths), "remote_images": reader.allow_remote,
                   "remote_networks": [str(n) for n in reader.fetcher.allow_networks]
                   if reader.fetcher else [],
                   "api_key": bool(server.api_key), "host_allow": list(server.host_allow),
                   "cors_origins": list(server.cors_origins),
                   "constraints": BOUNDS.to_dict()},
        "concurrency": {"parallel": owl.parallel, "window": owl.window,
                        "prefill_chunk": owl.engine.prefill_chunk,
                        "slots": owl.engine.slots(), "waiting": owl.engine.queued()},
        "queue": queue.to_dict(),
        "supported_fields": field_table.acted_on(),
        "unsupported_fields": field_table.accepted_only_as(),
        "responses_fields": {"supported": field_table.acted_on((field_table.RESPONSES,)),
                             "unsupported": field_table.accepted_only_as(
                                 (field_table.RESPONSES,))},
        "image_forms": "image_url parts and `images` items: data: URLs, raw base64; file:// "
                       "only under --allow-path folders; http(s) only with --allow-remote-images",
        "clips": {"parts": ["video_url", "input_video", "image_url (an animated picture)"],
                  "frames_per_clip": clips.DEFAULT_FRAMES,
                  "decode_seconds": clips.BOUNDS.seconds,
                  "decode_memory_bytes": clips.BOUNDS.memory_bytes,
                  "video": importlib.util.find_spec("av") is not None},
    })


@api()
async def metrics_route(request: Request, server: Server) -> Response:
    if request.query_params.get("format") == "json":
        return JSONResponse(server.metrics.to_dict(server.queue))
    return Response(server.metrics.prometheus(server.queue), media_type=PROMETHEUS_TYPE)


# -- answering ------------------------------------------------------------------------------------

@api()
async def chat_completions(request: Request, server: Server) -> Response:
    started, deadline = time.perf_counter(), server.deadline()
    body = await read_body(request, server, deadline)
    asked = fields.parse(body, server.limits)
    messages = fields.required(body, "messages", list, "a list of {role, content} messages")
    check_image_count(count_image_parts(messages), server.limits, "messages")
    functions, callable_, params = tool_calls.offer(body.get("tools"), body.get("tool_choice"),
                                                    asked.params)
    asked = replace(asked, params=params)

    def prepare():
        return prepare_messages(server, messages, "messages", deadline, functions)

    shape = ChatShape(server.model_id, _token_bytes(server, asked),
                      callable_[1] if callable_ else None)
    try:
        return await _reply(request, server, shape, prepare, asked, trim=True, deadline=deadline,
                            started=started)
    except GrammarError as e:  # the tools' grammar: named as the client sent it
        if not callable_ or e.param != "grammar":
            raise
        raise GrammarError(str(e).replace("grammar", "tools", 1), "tools") from None


@api()
async def completions(request: Request, server: Server) -> Response:
    started, deadline = time.perf_counter(), server.deadline()
    body = await read_body(request, server, deadline)
    asked = fields.parse(body, server.limits, completions=True)
    prompt = fields.prompt_text(body)
    sources = fields.image_list(body)
    check_image_count(len(sources), server.limits, "images")
    return await _reply(
        request, server, TextShape(server.model_id, _token_bytes(server, asked)),
        lambda: prepare_request(server, prompt, sources, "images", lambda i: f"images[{i}]", deadline),
        asked, trim=False, deadline=deadline, started=started)


def _token_bytes(server: Server, asked: fields.Request):
    """The vocabulary's token -> bytes when the request asked for logprobs, else None."""
    return server.owl.tokenizer.token_to_bytes if asked.params.logprobs else None


async def _reply(request: Request, server: Server, shape, prepare: Callable[[], Prepared],
                  asked: fields.Request, trim: bool, deadline: float, started: float
                  ) -> Response:
    """Start the request's choices (answering.start_choices) and reply in OpenAI's shape: all at
    once, or as events."""
    try:
        choices, firsts = await start_choices(request, server, prepare,
                                              fields.choice_params(asked), trim, deadline,
                                              started)
    except ClientGone:  # gone while it waited: its slots go to the next requests
        return Response(status_code=499)
    if asked.stream:
        return AnswerStream(_events(request, server, shape, choices, firsts, asked), choices)
    try:
        texts = []
        for choice, first in zip(choices, firsts):  # decoded together; read one after another
            parts = [first or ""]
            while choice.finish is None:
                if await request.is_disconnected():
                    await close_all(choices, disconnected=True)
                    return Response(status_code=499)  # nobody reads it: nginx's "client closed"
                parts.append(await choice.next() or "")
            texts.append("".join(parts))
    finally:
        await close_all(choices)
    replies = [shape.response(text, choice.finish, choice.usage_stats())
               for text, choice in zip(texts, choices)]
    reply = replies[0]
    for index, other in enumerate(replies[1:], start=1):
        reply["choices"].append({**other["choices"][0], "index": index})
    reply["usage"] = _usage(choices)
    reply["timings"] = choices[0].timings()
    return JSONResponse(reply)


def _usage(choices: list[Reply]) -> dict:
    """The prompt once, the completions of every choice."""
    usage = openai_chat.usage(choices[0].usage_stats())
    completion = sum(a.usage_stats().generated_tokens for a in choices)
    return {**usage, "completion_tokens": completion,
            "total_tokens": usage["prompt_tokens"] + completion}


def _indexed(chunk: dict, index: int) -> dict:
    if index:
        chunk["choices"] = [{**choice, "index": index} for choice in chunk["choices"]]
    return chunk


async def _events(request: Request, server: Server, shape, choices: list[Reply],
                  firsts: list, asked: fields.Request):
    """The choices as server-sent events: the chunks (each choice's with its index, in turns:
    the engine decides a token of each per step), each choice's last chunk, the usage and
    timings with the last one, then [DONE]. With stream_options.include_usage, as OpenAI: every
    chunk has "usage": null and an extra last chunk with no choices holds usage and timings. A
    client gone between two pieces ends the choices (AnswerStream closes them). With llama-server's
    timings_per_token, each content chunk carries its choice's timings so far."""
    include_usage = asked.include_usage

    def sent(chunk: dict) -> str:
        return event({**chunk, "usage": None} if include_usage else chunk)

    def content(choice: Reply, text: str, index: int) -> dict | None:
        chunk = shape.chunk(text, *choice.new_logprobs(), index=index)
        if chunk is None:  # held: a tool call being written
            return None
        chunk = _indexed(chunk, index)
        return {**chunk, "timings": choice.timings()} if asked.timings_per_token else chunk

    for index in range(len(choices)):
        for chunk in shape.first_chunks():
            yield sent(_indexed(chunk, index))
    texts, active, last = list(firsts), list(range(len(choices))), None
    try:
        while active:
            for index in list(active):
                choice, text = choices[index], texts[index]
                if text and (chunk := content(choice, text, index)) is not None:
                    yield sent(chunk)
                if choice.finish is not None:
                    active.remove(index)
                    *before_last, last = [_indexed(c, index)
                                          for c in shape.last_chunks(choice.finish, index)]
                    for chunk in before_last:
                        yield sent(chunk)
                    if active:
                        yield sent(last)
                    continue
                if await request.is_disconnected():
                    return
                texts[index] = await choice.next()
    except Owl2Error as e:
        # The 200 went out with the first event: the error becomes the stream's last event.
        await close_all(choices)
        server.metrics.stream_errors += 1
        yield event(error_body(400 if isinstance(e, _REQUEST_ERRORS) else 500, str(e),
                               code=_code(e)))
        return
    await close_all(choices)
    totals = {"usage": _usage(choices), "timings": choices[0].timings()}
    if include_usage:
        yield sent(last)
        yield event({**shape.usage_chunk(), **totals})
    else:
        yield event({**last, **totals})
    yield DONE
