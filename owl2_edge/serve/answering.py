"""One request's way to the engine, whatever its protocol (OpenAI's routes in app.py, ollama's in
ollama.py): its body read within its time, its prompt and images prepared on a worker thread,
its grammar compiled there within the bounds, a place taken in the admission (429 when full),
its choices queued with the engine and their first pieces awaited. What each protocol then
renders, and how, is its own module's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

import anyio
from starlette.responses import StreamingResponse

from owl2_edge import openai_chat
from owl2_edge.constraint_bounds import BOUNDS
from owl2_edge.errors import GrammarError, PromptError
from owl2_edge.grammar_worker import LarkWorker
from owl2_edge.serve.answer import ClientGone, Reply
from owl2_edge.serve.limits import ApiError, Limits, bad_request, read_json

if TYPE_CHECKING:
    from starlette.requests import Request

    from owl2_edge.owl2 import Prepared
    from owl2_edge.sampling import SamplingParams
    from owl2_edge.serve.app import Server


async def read_body(request: Request, server: "Server", deadline: float) -> dict:
    """The JSON body, read within the request's time (a client that sends it slowly holds a
    connection, never the model)."""
    try:
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            return await read_json(request, server.limits.max_body_bytes, server.max_json_values)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within the request time limit "
                            f"({server.limits.request_timeout_s:g} s)",
                       code="request_timeout") from None


def prepare_request(server: "Server", prompt: str, sources: list, param: str, label, deadline: float
             ) -> "Prepared":
    """On a worker thread: refuse a prompt that cannot fit from its length (before reading an
    image or tokenizing), read the images within the limits, tokenize (Owl2.prepare)."""
    server.owl.check_prompt_size(prompt, len(sources))
    images = [server.reader.read(source, param, label(i), deadline)
              for i, source in enumerate(sources)]
    return server.owl.prepare(prompt, images)


def prepare_messages(server: "Server", messages: list, param: str, deadline: float,
                     functions: list[dict] | None = None, until_question: bool = False
                     ) -> "Prepared":
    """prepare_request for chat messages (openai_chat.messages_to_prompt): the prompt first,
    the images' urls kept as they are until the reader reads them under the limits; `param`
    names the field they came in."""
    try:
        prompt, urls = openai_chat.messages_to_prompt(messages, read_image=lambda url: url,
                                                      functions=functions,
                                                      until_question=until_question)
    except PromptError as e:
        raise bad_request(str(e), param=param) from None
    return prepare_request(server, prompt, urls, param, lambda i: f"image {i + 1}", deadline)


def check_image_count(n: int, limits: Limits, param: str) -> None:
    if n > limits.max_images:
        raise bad_request(f"{n} images: this server takes at most {limits.max_images} per request "
                          f"(owl2 serve --max-images)", param=param, code="too_many_images")


def _yield_the_cores() -> None:
    """The compile thread's OS priority lowered (nice 19, this thread only: Linux's
    setpriority takes a thread id), so that a compile runs on what the engine and the event
    loop leave, and its GBNF converter started (it inherits the priority)."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    try:
        _CONVERTER.start()
    except OSError:
        pass  # the first grammar tries again, and fails as one GrammarError if it must


# Grammars are compiled on one thread of their own, one at a time, at the lowest priority: a
# stream of large grammars then takes from the answers neither a core (on 2 cores, half) nor
# time they would have run in; the compiles wait their turn, in their own time. What of a
# compile is Python (GBNF to Lark) runs in a child process (grammar_worker): on this thread it
# would hold the interpreter lock while the OS, honouring the low priority, runs other work.
_CONVERTER = LarkWorker()
_COMPILER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="owl2-compile",
                                                  initializer=_yield_the_cores)


def start_compiler() -> None:
    """The compile thread and its converter started now (at a server's start), not at the first
    grammar a client sends."""
    _COMPILER.submit(lambda: None).result()


async def compile_constraint(server: "Server", params, deadline: float):
    """The request's grammar, compiled on the compile thread (up to about a second for a
    large one: the event loop and the engine go on meanwhile), within BOUNDS.compile_seconds
    and the request's time, its wait for the thread included; None without one. Compiled
    grammars are kept per model (Owl2.constraint). A conversion past its time is killed; a
    compile past its time is left to finish and its result dropped."""
    spec = params.constraint
    if spec is None:
        return None
    limit = max(0.0, min(BOUNDS.compile_seconds, deadline - time.monotonic()))
    until = time.monotonic() + limit

    def to_lark(text: str, field: str) -> str:
        return _CONVERTER.lark(text, field, max(0.0, until - time.monotonic()))
    try:
        with anyio.fail_after(limit):
            return await asyncio.wrap_future(_COMPILER.submit(server.owl.constraint, spec,
                                                              to_lark))
    except TimeoutError:
        raise GrammarError(f"{spec.field} took longer than {limit:g} s to compile "
                           f"(docs/structured.md, bounds)", spec.field) from None


async def start_choices(request: "Request", server: "Server", prepare: Callable[[], "Prepared"],
                        choice_params: Sequence["SamplingParams"], trim: bool, deadline: float,
                        started: float) -> tuple[list[Reply], list]:
    """Take a place in the admission (429 when full), prepare the request on a worker thread,
    compile its grammar, queue one answer per choice (they share the prompt's cells) and await
    each first piece (the prefill): its errors are still a plain 4xx then. Returns the choices
    and their first pieces (None: the answer ended without text); ClientGone when the client
    left meanwhile (its slots are freed)."""
    server.queue.enter()
    choices: list[Reply] = []
    try:
        prepared = await anyio.to_thread.run_sync(prepare)
        constraint = await compile_constraint(server, choice_params[0], deadline)
        for params in choice_params:
            choice = Reply(server.owl, server.metrics, len(prepared.pixels), deadline, started)
            choices.append(choice)
            choice.start(prepared, params, trim, constraint)
    except BaseException:
        await close_all(choices)
        raise
    finally:
        server.queue.submitted()
    try:
        firsts = [await choice.next(request) for choice in choices]
    except ClientGone:
        await close_all(choices, disconnected=True)
        raise
    except BaseException:
        await close_all(choices)
        raise
    return choices, firsts


async def read_whole(request: "Request", reply: Reply, first) -> str | None:
    """One answer read to its end and closed: its text, or None when the client left
    meanwhile (its slot is freed)."""
    try:
        parts = [first or ""]
        while reply.finish is None:
            if await request.is_disconnected():
                await close_all([reply], disconnected=True)
                return None
            parts.append(await reply.next() or "")
    finally:
        await close_all([reply])
    return "".join(parts)


class AnswerStream(StreamingResponse):
    """A streamed response whose answers are closed however it ends: at its end, or when the
    client leaves (Starlette then cancels the stream, possibly between two events, where the
    body's own `finally` would wait for the garbage collector). Server-sent events by default."""

    def __init__(self, body, choices: list[Reply], media_type: str = "text/event-stream"):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} \
            if media_type == "text/event-stream" else None
        super().__init__(body, media_type=media_type, headers=headers)
        self.choices = choices

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                for choice in self.choices:
                    await choice.close(disconnected=choice.finish is None)


async def close_all(choices: list[Reply], disconnected: bool = False) -> None:
    for choice in choices:
        await choice.close(disconnected=disconnected)


__all__ = ["AnswerStream", "check_image_count", "close_all", "compile_constraint", "prepare_messages",
           "prepare_request", "read_body", "start_choices", "start_compiler"]
