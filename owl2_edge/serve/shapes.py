"""The response objects, as the OpenAI API and llama-server write them: `chat.completion` and its
chunks (openai_chat.Completion, shared with Owl2.create_chat_completion), `text_completion`
and its chunks, llama-server's `timings`, and server-sent events."""

from __future__ import annotations

import json
import time
import uuid

from owl2_edge.openai_chat import Completion, chat_logprobs, text_logprobs, usage
from owl2_edge.stats import Stats
from owl2_edge.tool_calls import HeldCall, parse_call


class ChatShape:
    """POST /v1/chat/completions: `chat.completion`, or `chat.completion.chunk`s. token_bytes:
    the vocabulary's, when the request asked for logprobs; functions: the tools an answer may
    call (tool_calls.py), when it may: an answer that is a call becomes `tool_calls`, and in a
    stream it is held until it ends (a call's arguments are sent whole, in one chunk)."""

    def __init__(self, model: str, token_bytes=None, functions: list[dict] | None = None):
        self.completion = Completion(model)
        self.token_bytes = token_bytes
        self.functions = functions
        self._held: dict[int, HeldCall] = {}  # each choice's, in a stream

    def response(self, text: str, finish: str, stats: Stats) -> dict:
        logprobs = chat_logprobs(stats.logprobs, self.token_bytes) if self.token_bytes else None
        call = parse_call(text, self.functions) if self.functions else None
        return self.completion.response(text, stats, finish, logprobs, call)

    def first_chunks(self) -> list[dict]:
        return [self.completion.chunk({"role": "assistant"})]

    def chunk(self, text: str, entries=(), first: bool = False, index: int = 0) -> dict | None:
        """entries: the TokenLogprobs of the tokens that made `text`; first: they start at the
        answer's first token. None while the text is held (a tool call being written)."""
        if self._held.setdefault(index, HeldCall(self.functions)).hold(text):
            return None
        logprobs = chat_logprobs(entries, self.token_bytes, first) if self.token_bytes else None
        return self.completion.chunk({"content": text}, logprobs=logprobs)

    def last_chunks(self, finish: str, index: int = 0) -> list[dict]:
        """What ends a choice's stream: its held call (or, when the text held turned out not
        to be one, that text), then the finish reason."""
        return self.completion.last_chunks(self._held.pop(index, HeldCall(None)), finish)

    def usage_chunk(self) -> dict:
        """stream_options.include_usage's extra last chunk, before its usage is added."""
        return {**self.completion.chunk({}), "choices": []}


class TextShape:
    """POST /v1/completions: `text_completion`, streamed as `text_completion` objects too."""

    def __init__(self, model: str, token_bytes=None):
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.token_bytes = token_bytes
        self._offset = 0  # characters streamed so far (text_offset)

    def response(self, text: str, finish: str, stats: Stats) -> dict:
        logprobs = text_logprobs(stats.logprobs, self.token_bytes) if self.token_bytes else None
        return {**self._object(text, finish, logprobs), "usage": usage(stats)}

    def first_chunks(self) -> list[dict]:
        return []

    def chunk(self, text: str, entries=(), first: bool = False, index: int = 0) -> dict:
        logprobs = None
        if self.token_bytes:
            logprobs = text_logprobs(entries, self.token_bytes, self._offset)
        self._offset += len(text)
        return self._object(text, None, logprobs)

    def last_chunks(self, finish: str, index: int = 0) -> list[dict]:
        return [self._object("", finish)]

    def usage_chunk(self) -> dict:
        return {**self._object("", None), "choices": []}

    def _object(self, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                             "finish_reason": finish}]}


def timings(stats: Stats, decode_seconds: float) -> dict:
    """llama-server's timings: prompt_n positions evaluated in prompt_ms, predicted_n tokens in
    predicted_ms, cache_n positions the KV cache already held (not evaluated again)."""
    prefill = stats.timings.get("prefill", 0.0)
    evaluated, generated = stats.evaluated_positions, stats.generated_tokens
    return {
        "cache_n": stats.reused_positions,
        "prompt_n": evaluated,
        "prompt_ms": round(prefill * 1e3, 3),
        "prompt_per_token_ms": round(prefill * 1e3 / evaluated, 3) if evaluated else 0.0,
        "prompt_per_second": round(evaluated / prefill, 2) if prefill else 0.0,
        "predicted_n": generated,
        "predicted_ms": round(decode_seconds * 1e3, 3),
        "predicted_per_token_ms": round(decode_seconds * 1e3 / generated, 3) if generated else 0.0,
        "predicted_per_second": round(generated / decode_seconds, 2) if decode_seconds else 0.0,
        # owl2-edge's own: the vision model's time and runs, the time to the first token.
        "vision_ms": round(stats.timings.get("vision", 0.0) * 1e3, 3),
        "images_encoded": stats.images_encoded,
        "first_token_ms": round(stats.timings.get("first_token", 0.0) * 1e3, 3),
    }


def event(data: dict | str) -> str:
    """One server-sent event: a `data:` line and the blank line that ends it."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False,
                                                          separators=(",", ":"))
    return f"data: {text}\n\n"


DONE = event("[DONE]")
