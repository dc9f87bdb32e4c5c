"""POST /v1/warm (owl2-edge's own): read a question's beginning ahead while its user types
(Owl2.warm; docs/serve.md). The body is a chat request without its question: `messages`, the
conversation so far, the last one a user message whose pictures are given and whose text is not.
The pictures are encoded and that part of the prompt prefilled in steps no answer uses; the
question, sent later through /v1/chat/completions with the same messages and its text, finds
that work done.

Bounded as every request is (body size, images per request, the key, the origin checks); at most
--parallel warms are kept going (a new one drops the oldest still going), and what a warm holds
is idle cells, evicted least recently used first when an answer needs the room.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import anyio
from starlette.responses import JSONResponse, Response

from owl2_edge.serve import fields
from owl2_edge.serve.answering import check_image_count, prepare_messages, read_body
from owl2_edge.serve.images import count_image_parts
from owl2_edge.serve.limits import bad_request

if TYPE_CHECKING:
    from starlette.requests import Request

    from owl2_edge.engine import Job
    from owl2_edge.serve.app import Server

_FIELDS = {"model", "messages"}


def _check(body: dict) -> list:
    for name in body:
        if name not in _FIELDS:
            raise bad_request(f"unknown field {name!r}: a warm takes messages (and model)",
                              param=name, code="unknown_field")
    messages = fields.required(body, "messages", list, "the conversation so far, the last a "
                                                       "user message with its pictures")
    last = messages[-1] if messages else None
    parts = last.get("content") if isinstance(last, dict) else None
    if not isinstance(last, dict) or last.get("role") != "user" or not isinstance(parts, list) \
            or not any(isinstance(p, dict) and p.get("type") == "image_url" for p in parts):
        raise bad_request("the last message must be the user's, with its pictures as image_url "
                          "parts (what is read ahead)", param="messages")
    if any(not isinstance(p, dict) or p.get("type") != "image_url" for p in parts):
        raise bad_request("the last message holds pictures only: its question is sent later, "
                          "with /v1/chat/completions", param="messages")
    return messages


async def warm(request: Request, server: Server) -> Response:
    deadline = server.deadline()
    body = await read_body(request, server, deadline)
    messages = _check(body)
    check_image_count(count_image_parts(messages), server.limits, "messages")

    prepared = await anyio.to_thread.run_sync(
        lambda: prepare_messages(server, messages, "messages", deadline, until_question=True))
    job = server.owl.submit_warm(prepared)
    _keep(server, job)
    return JSONResponse({"object": "warm", "prompt_positions": job.positions,
                         "images": len(prepared.pixels)})


def _keep(server: Server, job: Job) -> None:
    """At most --parallel warms going: the oldest still going is dropped for a new one."""
    going: deque = server.warms
    while going and going[0].finished:
        going.popleft()
    going.append(job)
    unfinished = [j for j in going if not j.finished]
    for old in unfinished[:max(0, len(unfinished) - server.owl.parallel)]:
        old.cancel()
        going.remove(old)


__all__ = ["warm"]
