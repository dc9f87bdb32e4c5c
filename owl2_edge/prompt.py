"""The mPLUG-Owl2 prompt template (conv_mplug_owl2, docs/architecture.md §7) and where images go in it.

A conversation renders as
    "USER: <|image|>What is this? ASSISTANT: A banner.</s>USER: Is it red? ASSISTANT:"
with no system prompt: upstream's template object has one, but never emits it. A system text
(an app's instructions, or the tools a model may call) goes at the start of the first question,
before its images:
    "USER: To call a tool, ... Tools: [...] <|image|>Report the red shape. ASSISTANT:"
A clip is one image slot per frame, in time order, before the question (docs/design.md §10).

Tools are given in one form (the demo model is trained on it; docs/design.md §10): the system text
TOOLS_INTRO followed by the functions as one JSON list of {"name", "description", "parameters"}
objects, and a call is answered as one JSON object {"name": ..., "arguments": {...}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from owl2_edge import checks, names
from owl2_edge.errors import ArgumentError, PromptError


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str | None = None   # None: the turn the model is about to answer


# What a list of callable functions is introduced by, in the system text (tools_text).
TOOLS_INTRO = 'To call a tool, answer {"name": ..., "arguments": {...}}. Tools: '


def tools_text(functions: list[dict]) -> str:
    """The system text that offers `functions` ({"name", "description", "parameters"} each)."""
    return TOOLS_INTRO + json.dumps(functions)


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as the model writes it (json.dumps' layout, the grammar engine's too)."""
    return json.dumps({"name": name, "arguments": arguments})


# What a tool's result is introduced by, as the user's next turn (an app's role "tool" message).
TOOL_RESULT = "The tool answered: "


def render(turns: list[Turn], n_images: int = 0, system: str | None = None) -> str:
    """The template applied to a conversation whose last turn is open (assistant None).

    Images go where the user put <|image|> marks; without marks, all of them go before the first
    question, as upstream's CLI does. `system` goes first in the first question, before its
    images."""
    if not turns or turns[-1].assistant is not None or any(t.assistant is None for t in turns[:-1]):
        raise ArgumentError("a prompt needs finished turns followed by exactly one open turn")
    for t in turns:
        checks.text("a question", t.user)
        if t.assistant is not None:
            checks.text("an answer", t.assistant)
    marks = sum(t.user.count(names.IMAGE_PLACEHOLDER) for t in turns)
    if marks == 0 and n_images:
        first = turns[0]
        turns = [Turn(names.IMAGE_PLACEHOLDER * n_images + first.user, first.assistant), *turns[1:]]
    else:
        check_image_count(marks, n_images)
    if system:
        checks.text("a system text", system)
        turns = [Turn(f"{system} {turns[0].user}", turns[0].assistant), *turns[1:]]
    parts = []
    for turn in turns:
        parts.append(f"{names.USER_ROLE}: {turn.user}{names.USER_SEP}")
        if turn.assistant is None:
            # The open turn ends with "ASSISTANT:" and no space: the model's first piece brings it.
            parts.append(f"{names.ASSISTANT_ROLE}:")
        else:
            parts.append(f"{names.ASSISTANT_ROLE}: {turn.assistant}{names.ASSISTANT_SEP}")
    return "".join(parts)


# Stands for the question while a prompt is rendered only up to it (before_question): a
# private-use character, which no question of a user's holds by accident.
_QUESTION_MARK = "\ue000"


def before_question(turns: list[Turn], n_images: int = 0, system: str | None = None) -> str:
    """render(turns, ...) cut where the open turn's question text would begin (after its image
    marks, if it has any): the part of a prompt known before the question is typed, which
    Owl2.warm prefills ahead. A question's prompt starts with it, up to the tokenization of its
    last characters (the KV prefix reuse keeps what is common)."""
    *done, open_turn = turns
    text = render([*done, Turn(open_turn.user + _QUESTION_MARK)], n_images, system)
    return text[:text.index(_QUESTION_MARK)]


def check_image_count(marks: int, n_images: int) -> None:
    if marks != n_images:
        raise PromptError(f"the prompt has {marks} {names.IMAGE_PLACEHOLDER} mark(s) but "
                          f"{n_images} image(s) were given")
