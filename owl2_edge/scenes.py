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
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

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
COUNT_WORDS = ("One", "Two", "Three")
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

    def draw(self, size: int = 224) -> Image.Image:
        """The scene as an RGB picture size × size."""
        rng = random.Random(self.seed)
        grey = rng.randint(150, 250)
        background = tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        pen = ImageDraw.Draw(image)
        for t in self.things:
            cx, cy = PLACES[t.place]
            cx = (cx + rng.uniform(-_OFFSET, _OFFSET)) * size
            cy = (cy + rng.uniform(-_OFFSET, _OFFSET)) * size
            half = rng.uniform(*_HALF_SIZE) * size
            fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[t.color])
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


def random_scene(rng: random.Random, split: str) -> Scene:
    """A scene whose layout belongs to `split` (drawn again until it does)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    while True:
        n = rng.randint(1, MAX_SHAPES)
        places = rng.sample(list(PLACES), n)
        things = tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), p) for p in places)
        scene = Scene(things, rng.getrandbits(32))
        if scene.split == split:
            return scene


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
