"""Streaming detokenization that only ever emits whole UTF-8 characters.

LLaMA's vocabulary has byte tokens (<0xE6>, ...): one character can arrive in two or three
tokens. Bytes are held until they complete a character, so a terminal or an app never receives
half of one.
"""

from __future__ import annotations

from typing import Callable


class Utf8Stream:
    def __init__(self, token_to_bytes: Callable[[int], bytes]):
        self._token_to_bytes = token_to_bytes
        self._pending = b""

    def push(self, token: int) -> str:
        """Text completed by this token (possibly empty)."""
        self._pending += self._token_to_bytes(token)
        try:
            text = self._pending.decode("utf-8")
            self._pending = b""
            return text
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":
                # Emit what is complete; keep the unfinished tail for the next token.
                text = self._pending[:e.start].decode("utf-8", errors="replace")
                self._pending = self._pending[e.start:]
                return text
            # Not UTF-8 at all (a model can emit any byte): show it rather than stall forever.
            text = self._pending.decode("utf-8", errors="replace")
            self._pending = b""
            return text

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text
