"""Exact-match accuracy of a model folder over questions with known answers (`owl2 eval`).

    items = generated_items(200)          # held-out pictures of shapes (owl2_edge/scenes.py)
    items = generated_items(200, suite="clips", frames=4)   # or "requests": JSON and the tool
    items = read_items("questions.jsonl") # {"image", "question", "answer"[, "type"]} per line
    report = evaluate(owl, items)         # greedy answers, scored per question type
    report.accuracy("color")

A JSON line takes the keys upstream's evaluation scripts use: "image" (a path, relative to the
file's folder), "question" (or "text"), "answer" (or "answers": a list, any of which counts), and
an optional "type" (or "question_type") to group the score by. An answer matches when it equals
the expected one after normalize(): case, surrounding spaces and one final period do not count.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from owl2_edge import checks, scenes, textfiles
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError

# The picture size generated items are drawn at (the runtime resizes it to the model's).
GENERATED_DRAW_SIZE = 224
# An eval file bigger than this is refused (a line is a few hundred bytes).
MAX_DATA_BYTES = 64 * 2**20
UNTYPED = "all"
# Answers in the scenes are a few tokens: a longer answer is already wrong.
DEFAULT_MAX_TOKENS = 16
# A JSON answer or a tool call is longer: up to 62 tokens with the demo's tokenizer.
LONG_ANSWER_TOKENS = 96
# What generated_items makes: the picture questions, the JSON question and the tool (with and
# without the schema), or questions about clips.
SUITES = ("pictures", "requests", "clips")
DEFAULT_FRAMES = 4


@dataclass(frozen=True)
class Item:
    image: object            # a path, bytes or a PIL image; a list of them (a clip's frames, in
                             # order); None for a text-only question
    question: str
    answers: tuple[str, ...]
    kind: str = UNTYPED
    system: str | None = None        # put first in the question (prompt.render)
    json_schema: dict | None = None  # the answer is constrained to it
    max_tokens: int | None = None    # instead of evaluate()'s


def generated_items(n_per_type: int, seed: int = 0, suite: str = "pictures",
                    frames: int = DEFAULT_FRAMES, shuffled: bool = False) -> list[Item]:
    """n_per_type held-out questions of each type of a suite (layouts never seen in training):
    "pictures" (colour, count, shape at a place), "requests" (the picture as JSON, free and under
    scenes.SCENE_SCHEMA; with the report_shape tool offered, calls and plain replies), "clips"
    (which way a shape moves, which appears or disappears, how many frames show it, at `frames`
    frames; `shuffled` puts each clip's frames in another order, answers unchanged: the control
    that shows the order is read)."""
    n = checks.integer("n_per_type", n_per_type, 1, 100_000)
    seed = checks.integer("seed", seed, 0, 2**32 - 1)
    if suite not in SUITES:
        raise ArgumentError(f"suite {suite!r}: choose one of {', '.join(SUITES)}")
    if suite == "clips":
        frames = checks.integer("frames", frames, scenes.MIN_FRAMES, scenes.MAX_FRAMES)
        return [Item(_order(ex.clip.frames(GENERATED_DRAW_SIZE), shuffled, seed + i),
                     ex.question.text, (ex.question.answer,), ex.question.kind)
                for i, ex in enumerate(scenes.clip_examples(n, frames, seed))]
    if suite == "pictures":
        return [Item(ex.scene.draw(GENERATED_DRAW_SIZE), ex.question.text, (ex.question.answer,),
                     ex.question.kind)
                for ex in scenes.examples(n, seed)]
    items = []
    for ex in scenes.request_examples(n, seed):
        q, picture = ex.question, ex.scene.draw(GENERATED_DRAW_SIZE)
        system = scenes.REPORT_TOOL_OFFER if q.kind in scenes.TOOL_KINDS else None
        items.append(Item(picture, q.text, (q.answer,), q.kind, system,
                          max_tokens=LONG_ANSWER_TOKENS))
        if q.kind == "json":
            items.append(Item(picture, q.text, (q.answer,), "json_schema", None,
                              scenes.SCENE_SCHEMA, LONG_ANSWER_TOKENS))
    # The constrained JSON questions after the free ones, as every other type comes in a block.
    return sorted(items, key=lambda it: _REQUEST_ORDER.index(it.kind))


_REQUEST_ORDER = ("json", "json_schema", *scenes.TOOL_KINDS)


def _order(frames: list, shuffled: bool, seed: int) -> list:
    """The frames as they are, or in another order that shows something else (equal frames, as
    before a shape appears, swapped among themselves would show the same clip)."""
    if not shuffled:
        return frames
    rng = random.Random(seed)
    pixels = [f.tobytes() for f in frames]
    order = list(range(len(frames)))
    while [pixels[i] for i in order] == pixels:
        rng.shuffle(order)
    return [frames[i] for i in order]


def read_items(path: str | os.PathLike, need_answers: bool = True) -> list[Item]:
    """The lines of a JSONL file; every problem is an ArgumentError naming the line.
    need_answers=False (for compare) lets a line go without an answer."""
    lines, path = textfiles.lines("data", path, MAX_DATA_BYTES)
    items = []
    for line in lines:
        if not line.text.strip():
            continue
        where = f"{display_path(path)} line {line.number}"
        item = _item(textfiles.json_value(line.text, where), path, where, need_answers)
        # Text that is not valid Unicode cannot be tokenized: refused here, with its line.
        problem = textfiles.unicode_problem(line, {"question": item.question,
                                                   "answers": item.answers, "type": item.kind,
                                                   "image": None if item.image is None
                                                   else str(item.image)})
        if problem is not None:
            raise ArgumentError(f"{where}: {problem}")
        items.append(item)
    if not items:
        raise ArgumentError(f"{display_path(path)}: no questions in it")
    return items


def _item(row, path: Path, where: str, need_answers: bool) -> Item:
    if not isinstance(row, dict):
        raise ArgumentError(f"{where}: not a JSON object")
    question = row.get("question", row.get("text"))
    if not isinstance(question, str) or not question.strip():
        raise ArgumentError(f"{where}: needs a \"question\" (text)")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if answers is None and not need_answers:
        answers = []
    elif not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ArgumentError(f"{where}: needs an \"answer\" (text) or \"answers\" (a list of text)")
    kind = row.get("type", row.get("question_type", UNTYPED))
    if not isinstance(kind, str) or not kind:
        raise ArgumentError(f"{where}: \"type\" must be text")
    image = row.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise ArgumentError(f"{where}: \"image\" must be a path")
        image = path.parent / image
    return Item(image, question, tuple(answers), kind)


def normalize(answer: str) -> str:
    text = " ".join(answer.split()).lower()
    return text[:-1] if text.endswith(".") else text


def is_correct(answer: str, expected: Sequence[str]) -> bool:
    return normalize(answer) in {normalize(e) for e in expected}


@dataclass
class Report:
    """Per question type: how many were right out of how many."""
    correct: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, right: bool) -> None:
        self.total[kind] = self.total.get(kind, 0) + 1
        self.correct[kind] = self.correct.get(kind, 0) + int(right)

    def accuracy(self, kind: str | None = None) -> float:
        """One type's accuracy, or (None) over every question."""
        if kind is None:
            total = sum(self.total.values())
            return sum(self.correct.values()) / total if total else 0.0
        return self.correct[kind] / self.total[kind]

    def to_dict(self) -> dict:
        return {"types": {k: {"correct": self.correct[k], "total": self.total[k],
                              "accuracy": round(self.accuracy(k), 4)} for k in self.total},
                "accuracy": round(self.accuracy(), 4), "questions": sum(self.total.values())}


def evaluate(owl, items: Sequence[Item], max_tokens: int | None = None,
             on_progress: Callable[[int, int], None] | None = None) -> Report:
    """Greedy answers of `owl` (an Owl2) to every item, scored by exact match. max_tokens: the
    most tokens of every answer; None: each item's own (JSON and tool calls are longer), else
    DEFAULT_MAX_TOKENS."""
    if max_tokens is not None:
        checks.integer("max_tokens", max_tokens, 1, 4096)
    report = Report()
    for i, item in enumerate(items):
        images = [] if item.image is None else \
            list(item.image) if isinstance(item.image, (list, tuple)) else [item.image]
        constraint = {} if item.json_schema is None else {"json_schema": item.json_schema}
        answer = owl.ask(images, item.question, temperature=0, system=item.system,
                         max_tokens=max_tokens or item.max_tokens or DEFAULT_MAX_TOKENS,
                         **constraint)
        report.add(item.kind, is_correct(answer, item.answers))
        if on_progress:
            on_progress(i + 1, len(items))
    return report
