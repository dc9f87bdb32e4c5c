"""Generated pictures of coloured shapes and the questions asked about them (docs/design.md §10).

The demo model is trained on these scenes (convert/train_demo.py), `owl2 eval --generated N`
measures a model on them, and `owl2 demo` shows a few. A scene holds 1-3 shapes (circle,
square, triangle) in six colours, each at one of five places (left, right, top, bottom,
center), with sizes, offsets and the background varied. Three kinds of question are asked:

    color    "What color is the circle?"    -> "Red."      (only for a shape drawn once)
    count    "How many shapes are there?"   -> "Two."
    shape_at "What shape is on the left?"   -> "A triangle." (only for an occupied place)

The held-out split is by LAYOUT, the set of (place, shape) pairs: a layout is either for
training or held out, never both, so held-out accuracy is measured on arrangements the model
never saw (colours, sizes and offsets vary in both).

The demo's second edition also answers three other kinds of request (docs/design.md §10):

    json       "Describe the picture as JSON."  -> {"count": 2, "shapes": [{"place": "left",
               "shape": "triangle", "color": "red"}, ...]}   (SCENE_SCHEMA; shapes by place)
    tool_call  with REPORT_TOOL offered: "Report the red shape."
               -> {"name": "report_shape", "arguments": {"color": "red", "shape": "square"}}
    tool_reply with REPORT_TOOL offered, a question above -> its plain answer

and questions about CLIPS, 2-8 frames of one scene in which one shape moves, appears or
disappears (one image slot per frame, in time order):

    clip_move      "Which way does the square move?"   -> "Right."  (left, right, up, down)
    clip_appear    "Which shape appears?"               -> "A circle."
    clip_disappear "Which shape disappears?"            -> "A square."
    clip_frames    "How many frames show the circle?"   -> "Three."
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

from owl2_edge.prompt import tool_call_text, tools_text

SHAPES = ("circle", "square", "triangle")
# Name -> RGB; each drawn colour is jittered around this.
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 35),
    "purple": (135, 50, 170),
    "orange": (245, 135, 25),
}
# Place -> centre as a fraction of the side (x, y). The order is the auxiliary heads' slot order
# in training.
PLACES = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
# How each place is named in a question.
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "center": "in the center"}
NUMBER_WORDS = ("One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight")
COUNT_WORDS = NUMBER_WORDS[:3]
MAX_SHAPES = len(COUNT_WORDS)
QUESTION_TYPES = ("color", "count", "shape_at")

# A shape's half-size and its centre's offset from its place, as fractions of the side: the
# largest shapes at the nearest offsets still do not overlap (0.3 between places ≥ 2 · (0.13 +
# 0.02)). At the model's 112 pixels a shape is 20-29 pixels across, about two 14-pixel patches:
# smaller ones left the demo model unsure of circle against square.
_HALF_SIZE = (0.09, 0.13)
_OFFSET = 0.02
# One layout in HELD_OUT_EVERY is held out (chosen by the CRC-32 of its name).
HELD_OUT_EVERY = 5
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    place: str


@dataclass(frozen=True)
class Question:
    kind: str        # one of QUESTION_TYPES
    text: str
    answer: str


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    seed: int        # draws the sizes, offsets, jitter and background

    @property
    def layout(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((t.place, t.shape) for t in self.things))

    @property
    def split(self) -> str:
        return layout_split(self.layout)

    def questions(self) -> list[Question]:
        """Every question this scene answers, in a fixed order."""
        out = []
        shapes = [t.shape for t in self.things]
        for t in self.things:
            if shapes.count(t.shape) == 1:
                out.append(Question("color", f"What color is the {t.shape}?",
                                    f"{t.color.capitalize()}."))
        out.append(Question("count", "How many shapes are there?",
                            f"{COUNT_WORDS[len(self.things) - 1]}."))
        for t in self.things:
            out.append(Question("shape_at", f"What shape is {PLACE_PHRASES[t.place]}?",
                                f"A {t.shape}."))
        return out

    def draw(self, size: int = 224, *, moved: dict[int, tuple[float, float]] | None = None,
             hidden: frozenset[int] = frozenset()) -> Image.Image:
        """The scene as an RGB picture size × size.

        For a clip's frames: `moved` puts thing i's centre at (x, y) (fractions of the side)
        instead of its place, `hidden` leaves things out. The random draws are made for every
        thing either way, so each frame of a clip has the same background, sizes and colours."""
        rng = random.Random(self.seed)
        grey = rng.randint(150, 250)
        background = tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        pen = ImageDraw.Draw(image)
        for i, t in enumerate(self.things):
            cx, cy = (moved or {}).get(i, PLACES[t.place])
            cx = (cx + rng.uniform(-_OFFSET, _OFFSET)) * size
            cy = (cy + rng.uniform(-_OFFSET, _OFFSET)) * size
            half = rng.uniform(*_HALF_SIZE) * size
            fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[t.color])
            if i in hidden:
                continue
            box = (cx - half, cy - half, cx + half, cy + half)
            if t.shape == "circle":
                pen.ellipse(box, fill=fill)
            elif t.shape == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)],
                            fill=fill)
        return image


def layout_split(layout: tuple[tuple[str, str], ...]) -> str:
    key = ";".join(f"{place}:{shape}" for place, shape in sorted(layout))
    return "heldout" if zlib.crc32(key.encode()) % HELD_OUT_EVERY == 0 else "train"


def _in_split(split: str, draw):
    """draw() again until what it makes (a Scene or a Clip) has its layout in `split`."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    while True:
        made = draw()
        if made.split == split:
            return made


def random_scene(rng: random.Random, split: str) -> Scene:
    """A scene whose layout belongs to `split` (drawn again until it does)."""
    def draw() -> Scene:
        places = rng.sample(list(PLACES), rng.randint(1, MAX_SHAPES))
        things = tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in places)
        return Scene(things, rng.getrandbits(32))
    return _in_split(split, draw)


@dataclass(frozen=True)
class Example:
    """One held-out question: what `owl2 eval` scores."""
    scene: Scene
    question: Question


def examples(n_per_type: int, seed: int = 0, split: str = "heldout") -> list[Example]:
    """n_per_type questions of each type, each about its own scene, in a fixed order."""
    rng = random.Random(seed)
    out: list[Example] = []
    for kind in QUESTION_TYPES:
        while sum(e.question.kind == kind for e in out) < n_per_type:
            scene = random_scene(rng, split)
            choices = [q for q in scene.questions() if q.kind == kind]
            if choices:
                out.append(Example(scene, rng.choice(choices)))
    return out


def all_texts() -> list[str]:
    """Every question and answer the scenes can produce (the tokenizer's training text)."""
    texts = {f"What color is the {s}?" for s in SHAPES}
    texts |= {f"{c.capitalize()}." for c in COLORS}
    texts |= {"How many shapes are there?", *(f"{w}." for w in COUNT_WORDS)}
    texts |= {f"What shape is {p}?" for p in PLACE_PHRASES.values()}
    texts |= {f"A {s}." for s in SHAPES}
    return sorted(texts)


# --- Answers as JSON ------------------------------------------------------------------------------

JSON_QUESTION = "Describe the picture as JSON."
# The schema the JSON answer follows (the README's structured-output example uses it); the keys in
# its order, the shapes in PLACES order.
SCENE_SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_SHAPES},
        "shapes": {"type": "array", "minItems": 1, "maxItems": MAX_SHAPES, "items": {
            "type": "object",
            "properties": {"place": {"enum": list(PLACES)}, "shape": {"enum": list(SHAPES)},
                           "color": {"enum": list(COLORS)}},
            "required": ["place", "shape", "color"], "additionalProperties": False}},
    },
    "required": ["count", "shapes"], "additionalProperties": False,
}


def scene_json(scene: "Scene") -> str:
    """The scene as the JSON answer: json.dumps' layout, which is the grammar engine's too
    (owl2_edge/constrain.py JSON_LAYOUT), so free and constrained answers are the same text."""
    order = list(PLACES)
    shapes = [{"place": t.place, "shape": t.shape, "color": t.color}
              for t in sorted(scene.things, key=lambda t: order.index(t.place))]
    return json.dumps({"count": len(scene.things), "shapes": shapes})


def json_question(scene: "Scene") -> Question:
    return Question("json", JSON_QUESTION, scene_json(scene))


# --- A tool -------------------------------------------------------------------------------------

REPORT_TOOL = {
    "name": "report_shape",
    "description": "Report one shape.",
    "parameters": {"type": "object",
                   "properties": {"color": {"type": "string"}, "shape": {"type": "string"}},
                   "required": ["color", "shape"]},
}
# The system text that offers REPORT_TOOL (prompt.tools_text): what every tool question is asked
# with.
REPORT_TOOL_OFFER = tools_text([REPORT_TOOL])
TOOL_KINDS = ("tool_call", "tool_reply")


def tool_questions(scene: "Scene") -> list[Question]:
    """With REPORT_TOOL offered: the calls this scene can be asked for (a shape named by its
    colour when that colour is drawn once, or by its place), then the plain questions, whose
    answers stay plain."""
    colors = [t.color for t in scene.things]
    calls = []
    for t in scene.things:
        call = tool_call_text(REPORT_TOOL["name"], {"color": t.color, "shape": t.shape})
        if colors.count(t.color) == 1:
            calls.append(Question("tool_call", f"Report the {t.color} shape.", call))
        calls.append(Question("tool_call", f"Report the shape {PLACE_PHRASES[t.place]}.", call))
    plain = [Question("tool_reply", q.text, q.answer) for q in scene.questions()]
    return calls + plain


# --- Clips --------------------------------------------------------------------------------------

CLIP_KINDS = ("clip_move", "clip_appear", "clip_disappear", "clip_frames")
MIN_FRAMES, MAX_FRAMES = 2, len(NUMBER_WORDS)
# A moving shape travels along one of these lines of places; the shapes that stay are put off it.
_LINES = {"horizontal": ("left", "center", "right"), "vertical": ("top", "center", "bottom")}
_OFF_LINE = {"horizontal": ("top", "bottom"), "vertical": ("left", "right")}
# (line, +1 when the shape goes the line's way) -> the answer.
_DIRECTIONS = {("horizontal", 1): "Right", ("horizontal", -1): "Left",
               ("vertical", 1): "Down", ("vertical", -1): "Up"}
_CHANGES = ("move", "appear", "disappear")


@dataclass(frozen=True)
class Clip:
    """Frames of one scene in which things[0] (the actor) changes: it moves from its place to
    `end_place`, or appears at frame `change_at` (absent before), or disappears there (absent
    from then on). The other things stay put. Every shape in a clip is a different one."""
    change: str              # one of _CHANGES
    things: tuple[Thing, ...]
    n_frames: int
    seed: int
    end_place: str | None = None   # move
    change_at: int = 0             # appear / disappear

    @property
    def layout(self) -> tuple[tuple[str, str], ...]:
        pairs = {(t.place, t.shape) for t in self.things}
        if self.end_place:
            pairs.add((self.end_place, self.things[0].shape))
        return tuple(sorted(pairs))

    @property
    def split(self) -> str:
        return layout_split(self.layout)

    def shown(self, frame: int) -> bool:
        """Whether the actor is in the frame."""
        if self.change == "appear":
            return frame >= self.change_at
        if self.change == "disappear":
            return frame < self.change_at
        return True

    def frames(self, size: int = 224) -> list[Image.Image]:
        scene = Scene(self.things, self.seed)
        out = []
        for i in range(self.n_frames):
            moved = None
            if self.change == "move":
                t = i / (self.n_frames - 1)
                (x0, y0), (x1, y1) = PLACES[self.things[0].place], PLACES[self.end_place]
                moved = {0: (x0 + t * (x1 - x0), y0 + t * (y1 - y0))}
            hidden = frozenset() if self.shown(i) else frozenset({0})
            out.append(scene.draw(size, moved=moved, hidden=hidden))
        return out

    def questions(self) -> list[Question]:
        actor = self.things[0]
        out = []
        if self.change == "move":
            line = next(k for k, places in _LINES.items()
                        if actor.place in places and self.end_place in places)
            way = 1 if _LINES[line].index(self.end_place) > _LINES[line].index(actor.place) else -1
            out.append(Question("clip_move", f"Which way does the {actor.shape} move?",
                                f"{_DIRECTIONS[line, way]}."))
        else:
            verb = "appears" if self.change == "appear" else "disappears"
            out.append(Question(f"clip_{self.change}", f"Which shape {verb}?", f"A {actor.shape}."))
        shown = sum(self.shown(i) for i in range(self.n_frames))
        out.append(Question("clip_frames", f"How many frames show the {actor.shape}?",
                            f"{NUMBER_WORDS[shown - 1]}."))
        for t in self.things[1:]:
            out.append(Question("clip_frames", f"How many frames show the {t.shape}?",
                                f"{NUMBER_WORDS[self.n_frames - 1]}."))
        return out


def random_clip(rng: random.Random, split: str, n_frames: int, change: str | None = None) -> Clip:
    """A clip of n_frames whose layout belongs to `split`."""
    if not MIN_FRAMES <= n_frames <= MAX_FRAMES:
        raise ValueError(f"a clip has {MIN_FRAMES}-{MAX_FRAMES} frames, not {n_frames}")

    def draw() -> Clip:
        kind = change or rng.choice(_CHANGES)
        shapes = rng.sample(SHAPES, rng.randint(1, MAX_SHAPES))
        colors = [rng.choice(list(COLORS)) for _ in shapes]
        end, at = None, 0
        if kind == "move":
            line = rng.choice(list(_LINES))
            start, end = rng.sample(_LINES[line], 2)
            places = [start, *rng.sample(_OFF_LINE[line], len(shapes) - 1)]
        else:
            places = rng.sample(list(PLACES), len(shapes))
            at = rng.randint(1, n_frames - 1)
        things = tuple(Thing(s, c, p) for s, c, p in zip(shapes, colors, places))
        return Clip(kind, things, n_frames, rng.getrandbits(32), end, at)
    return _in_split(split, draw)


@dataclass(frozen=True)
class ClipExample:
    """One held-out question about a clip."""
    clip: Clip
    question: Question


def clip_examples(n_per_type: int, n_frames: int, seed: int = 0,
                  split: str = "heldout") -> list[ClipExample]:
    """n_per_type questions of each clip type, each about its own clip, in a fixed order."""
    rng = random.Random(seed)
    out: list[ClipExample] = []
    change_of = {"clip_move": "move", "clip_appear": "appear", "clip_disappear": "disappear"}
    for kind in CLIP_KINDS:
        while sum(e.question.kind == kind for e in out) < n_per_type:
            clip = random_clip(rng, split, n_frames, change_of.get(kind))
            choices = [q for q in clip.questions() if q.kind == kind]
            if kind == "clip_frames":
                choices = choices[:1]  # the actor's: the one that changes
            out.append(ClipExample(clip, rng.choice(choices)))
    return out


REQUEST_KINDS = ("json", *TOOL_KINDS)


def request_examples(n_per_type: int, seed: int = 0, split: str = "heldout") -> list[Example]:
    """n_per_type of each REQUEST_KINDS: the JSON question, and with the tool offered, calls and
    plain questions. The tool kinds' questions are asked with REPORT_TOOL_OFFER."""
    out: list[Example] = []
    rng = random.Random(seed + 1_000_003)
    for kind in REQUEST_KINDS:
        for _ in range(n_per_type):
            scene = random_scene(rng, split)
            pool = [json_question(scene)] if kind == "json" else \
                [q for q in tool_questions(scene) if q.kind == kind]
            out.append(Example(scene, rng.choice(pool)))
    return out
