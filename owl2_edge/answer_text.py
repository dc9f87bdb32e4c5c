"""The text of one answer as it is shown, decided once for every caller (docs/design.md §1).

Three rules turn the tokens an answer decides into the text its caller reads, streamed or not:

  - bytes become text only as whole UTF-8 characters (detok.Utf8Stream);
  - the answer ends where a stop string first appears, without it (stop.StopStrings);
  - the first text loses sentencepiece's word-start space, and with `trim` (every route but a raw
    completion's) whitespace at the end is never shown: it is held back until more text follows
    it, and dropped when the answer ends. A streamed answer is thereby exactly the non-streamed
    one, piece by piece.
"""

from __future__ import annotations

from typing import Callable, Sequence

from owl2_edge.detok import Utf8Stream
from owl2_edge.stop import StopStrings


class AnswerText:
    def __init__(self, token_to_bytes: Callable[[int], bytes], stops: Sequence[str] = (),
                 trim: bool = True):
        self._utf8 = Utf8Stream(token_to_bytes)
        self._stops = StopStrings(tuple(stops))
        self._trim = trim
        self._begun = False     # whether any text has been shown yet
        self._held_space = ""   # whitespace at the end of what was decided (trim)

    @property
    def stopped(self) -> bool:
        """A stop string has appeared: the answer is over."""
        return self._stops.hit

    def push(self, token: int) -> str:
        """The text that can be shown once `token` is decided (often "")."""
        return self._shown(self._stops.push(self._utf8.push(token)), last=False)

    def end(self) -> str:
        """What is left to show when the answer ends (after its last push)."""
        if self._stops.hit:
            return self._shown("", last=True)
        text = self._stops.push(self._utf8.flush())
        if not self._stops.hit:
            text += self._stops.flush()
        return self._shown(text, last=True)

    def _shown(self, text: str, last: bool) -> str:
        if not self._begun:
            text = text.lstrip()
            self._begun = bool(text)
        if not self._trim:
            return text
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = "" if last else text[len(body):]
        return body


__all__ = ["AnswerText"]
