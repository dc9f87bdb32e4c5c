"""Stop strings over a stream of text pieces: the answer ends where one first appears, without it
(answer_text.py applies them inside the answer loop, for every caller).

A piece may end with the start of a stop string ("...\\nUS" before "ER:"), so that tail is held
back until the next piece says whether the string follows; nothing held back is ever shown if it
turns out to be a stop string.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> str:
        """The text that is safe to show after `piece`; once a stop string appears, `hit` is set
        and the text before it is the last returned."""
        text = self.held + piece
        if not self.stops:
            self.held = ""
            return text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the answer has ended without a stop string."""
        held, self.held = self.held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The longest tail of `text` that is a proper head of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
