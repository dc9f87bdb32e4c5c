"""OpenAI-style chat messages in, chat completions out (the shapes llama-cpp-python's
create_chat_completion and the OpenAI API use), over the Owl2 prompt template.

mPLUG-Owl2 has no system prompt: a system message's text goes before the first user message.
Image parts are data: URLs (base64), file:// URLs or local paths; nothing is downloaded. A
video_url or input_video part, or an image_url whose bytes are a video or an animated picture,
is a clip: its frames take the part's place (clips.py).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Callable, Iterable, Iterator

from owl2_edge import names
from owl2_edge.errors import ImageError, PromptError
from owl2_edge.prompt import (TOOL_RESULT, Turn, before_question, render, tool_call_text,
                              tools_text)
from owl2_edge.stats import Stats
from owl2_edge.tool_calls import HeldCall


def messages_to_prompt(messages: list[dict], read_image: Callable | None = None,
                       functions: list[dict] | None = None, until_question: bool = False
                       ) -> tuple[str, list]:
    """Messages -> (the templated prompt, its images in order).

    read_image: an image_url part's url -> what Owl2 reads (bytes or a path); by default
    image_from_url. `owl2 serve` passes its own, which reads only what its options allow
    (owl2_edge/serve/images.py). functions: the tools offered (tool_calls.functions_of),
    put first in the system text (prompt.tools_text); an assistant message's tool_calls are
    its turn (prompt.tool_call_text), a "tool" message's content the user's next turn
    (prompt.TOOL_RESULT before it). until_question: the prompt only up to where the last
    message's text goes (prompt.before_question: what a warm prefills; that message then holds
    images and no text)."""
    read_image = read_image or image_from_url
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    system, turns, images = [], [], []
    pending_user: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"messages[{i}] must be a dict with 'role' and 'content', "
                              f"not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        text = "" if content is None and (calls or role == "tool") else \
            _content_text(content, images, read_image)
        if role == "system":
            system.append(text)
        elif role == "user":
            pending_user.append(text)
        elif role == "tool":
            pending_user.append(TOOL_RESULT + text)
        elif role == "assistant":
            if not pending_user:
                raise PromptError("an assistant message must follow a user message")
            said = [text] if text else []
            turns.append(Turn(" ".join(pending_user), " ".join(said + _calls_text(calls, i))))
            pending_user = []
        else:
            raise PromptError(f"messages[{i}]: unknown role {str(role)[:40]!r} "
                              f"(system, user, assistant or tool)")
    if not pending_user:
        raise PromptError("the last message must be the user's (or a tool's result)")
    turns.append(Turn(" ".join(pending_user)))
    if functions:
        system.insert(0, tools_text(functions))
    shape = before_question if until_question else render
    return shape(turns, n_images=len(images), system=" ".join(system) or None), images


def _calls_text(calls, i: int) -> list[str]:
    """An assistant message's tool_calls as the model writes each (prompt.tool_call_text)."""
    if calls is None:
        return []
    out = []
    try:
        for call in calls:
            function = call["function"]
            arguments = json.loads(function["arguments"])
            if not isinstance(function["name"], str) or not isinstance(arguments, dict):
                raise TypeError
            out.append(tool_call_text(function["name"], arguments))
    except (TypeError, KeyError, ValueError):
        raise PromptError(f"messages[{i}].tool_calls: each must be {{\"function\": {{\"name\": "
                          f"..., \"arguments\": \"<a JSON object>\"}}}}") from None
    return out


def _content_text(content, images: list, read_image: Callable) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PromptError("message content must be a string or a list of parts")
    parts = []
    for part in content:
        if not isinstance(part, dict):
            raise PromptError(f"a content part must be a dict with a 'type', not {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text", "")
            if not isinstance(text, str):
                raise PromptError(f"a text part's text must be a string, not {type(text).__name__}")
            parts.append(text)
        elif kind in ("image_url", "video_url"):
            # A clip (video or animated picture) is known by its content, whichever part it
            # comes in: Owl2 makes its frames (clips.py).
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            images.append(read_image(url))
            parts.append(names.IMAGE_PLACEHOLDER)
        elif kind == "input_video":
            images.append(read_image(_input_video_url(part.get("input_video"))))
            parts.append(names.IMAGE_PLACEHOLDER)
        else:
            raise PromptError(f"unknown content part type {str(kind)[:40]!r} (text, image_url, "
                              f"video_url or input_video)")
    return "".join(parts)


def _input_video_url(value) -> str:
    """An input_video part's {"data": base64, "format": ...} (llama-cpp-python's server's form,
    after OpenAI's input_audio) -> a data: URL. The format is not needed: the bytes say what
    they are."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise ImageError("input_video must be {\"data\": \"<base64>\", \"format\": ...}")
    unknown = sorted(set(value) - {"data", "format"})
    if unknown:
        raise PromptError(f"input_video.{unknown[0]} is not a field this server reads "
                          f"(data, format)")
    return "data:video/*;base64," + value["data"]


def image_from_url(url) -> bytes | str:
    """An image_url part's url -> the image's bytes (data: URL) or a local path."""
    if not isinstance(url, str) or not url:
        raise ImageError("image_url needs a url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ImageError("only base64 data: URLs are supported")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise ImageError("image_url: the data: URL is not valid base64") from None
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        raise ImageError(f"{url}: only local files and data: URLs are read (owl2-edge never downloads)")
    return url


class Completion:
    """One chat completion's identity (id, time, model) and its two output shapes."""

    def __init__(self, model: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model

    def response(self, text: str, stats: Stats, finish: str | None = None,
                 logprobs: dict | None = None, call: tuple[str, dict] | None = None) -> dict:
        """`finish`: the finish reason when not the one `stats` gives (a stop string);
        `logprobs`: chat_logprobs() when they were asked for; `call`: (name, arguments) when the
        answer is a tool call (tool_calls.parse_call): the message then carries it."""
        message = {"role": "assistant", "content": text}
        if call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call(*call)]}
            finish = "tool_calls"
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": finish or finish_reason(stats)}],
            "usage": usage(stats),
        }

    def chunks(self, pieces: Iterable[str], stats: Stats,
               token_bytes: Callable[[int], bytes] | None = None,
               functions: list[dict] | None = None) -> Iterator[dict]:
        """chat.completion.chunk dicts: the role, one per piece, then the finish reason.
        stats: the answer's own (read as the pieces come); token_bytes: with it, each chunk
        carries the logprobs of the tokens new since the last; functions: the tools the answer
        may call (a call is held and sent whole: tool_calls.HeldCall)."""
        yield self.chunk({"role": "assistant"})
        sent, held = 0, HeldCall(functions)
        for piece in pieces:
            entries = stats.logprobs
            first = sent == 0
            new, sent = entries[sent:], len(entries)
            if held.hold(piece):
                continue
            logprobs = chat_logprobs(new, token_bytes, first) if token_bytes and new else None
            yield self.chunk({"content": piece}, logprobs=logprobs)
        yield from self.last_chunks(held, finish_reason(stats))

    def last_chunks(self, held: HeldCall, finish: str) -> list[dict]:
        """What ends a streamed answer: its held call as one tool_calls delta and the finish
        reason "tool_calls", or the text held (not a call after all) and `finish`."""
        call = held.end()
        if call is not None:
            return [self.chunk({"tool_calls": [tool_call(*call, index=0)]}),
                    self.chunk({}, "tool_calls")]
        text = [self.chunk({"content": held.text})] if held.text else []
        return [*text, self.chunk({}, finish)]

    def chunk(self, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [{"index": 0, "delta": delta,
                                                  "logprobs": logprobs, "finish_reason": finish}]}


def tool_call(name: str, arguments: dict, index: int | None = None) -> dict:
    """OpenAI's tool_calls entry: an id of its own, the function's name and its arguments as a
    JSON string (with `index` in a streamed chunk)."""
    entry = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments)}}
    return entry if index is None else {"index": index, **entry}


def _token(token: int, token_bytes: Callable[[int], bytes]) -> tuple[str, list[int]]:
    raw = token_bytes(token)
    return raw.decode("utf-8", "replace"), list(raw)


def chat_logprobs(entries, token_bytes: Callable[[int], bytes], first: bool = True) -> dict:
    """OpenAI's chat logprobs object of sampling.TokenLogprob entries: {"content": [{token,
    logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}. first: the
    entries start at the answer's first token, whose text loses the word-start space that the
    content drops too (answer_text.py), so that the tokens' texts join to the content; `bytes`
    stay each token's own."""
    def one(token, logprob, lead=False):
        text, raw = _token(token, token_bytes)
        return {"token": text.lstrip() if lead else text, "logprob": logprob, "bytes": raw}
    return {"content": [{**one(e.token, e.logprob, first and k == 0),
                         "top_logprobs": [one(t, lp, first and k == 0) for t, lp in e.top]}
                        for k, e in enumerate(entries)],
            "refusal": None}


def text_logprobs(entries, token_bytes: Callable[[int], bytes], offset: int = 0) -> dict:
    """The legacy completions' logprobs object: tokens, token_logprobs, top_logprobs (a dict of
    token text: logprob per position) and text_offset (where each token starts, in characters,
    from `offset`). offset 0 is the answer's first token: its text loses the word-start space
    that the text drops too (chat_logprobs)."""
    tokens, offsets = [], []
    for k, e in enumerate(entries):
        text, _ = _token(e.token, token_bytes)
        if offset == 0 and k == 0:
            text = text.lstrip()
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token(t, token_bytes)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def finish_reason(stats: Stats) -> str:
    # OpenAI knows "stop" and "length"; a full context is a length stop to a client.
    return "stop" if stats.finish_reason == "stop" else "length"


def usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_positions, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_positions + stats.generated_tokens}
