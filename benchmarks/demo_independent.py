"""The demo model on pictures it was not drawn for: 24 questions about shapes drawn by this file's
own painter, not by owl2_edge/scenes.py (anti-aliased at 4x and reduced, outlined, other shades
of each colour, a lightly tinted, speckled grey background, sizes and offsets of its own), 8 per question
type. It shows whether the model learnt the shapes or the generator's pixels.

    python benchmarks/demo_independent.py [MODEL_DIR ...]    # default: the demo model's folder

Prints each wrong answer and "N/24" per folder (docs/measurements.md, "The demo model's training
runs").
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# Shades unlike scenes.COLORS' (CSS names), and where each place is (fractions of the side).
SHADES = {"red": (200, 20, 60), "green": (34, 139, 34), "blue": (65, 105, 225),
          "yellow": (255, 215, 0), "purple": (153, 50, 204), "orange": (255, 140, 0)}
WHERE = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
         "center": (0.5, 0.5)}
PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}
NUMBERS = ("One", "Two", "Three")
SIDE, SCALE = 256, 4


def paint(things: list[tuple[str, str, str]], rng: random.Random) -> Image.Image:
    """things: (shape, colour, place). Drawn at SCALE x, outlined, then reduced (anti-aliased)."""
    big = SIDE * SCALE
    grey = rng.randint(175, 235)
    tint = [grey + rng.randint(-15, 15) for _ in range(3)]
    image = Image.new("RGB", (big, big), tuple(tint))
    pen = ImageDraw.Draw(image)
    for _ in range(400):  # speckles
        x, y = rng.randrange(big), rng.randrange(big)
        shade = tuple(max(0, c - rng.randint(10, 30)) for c in tint)
        pen.ellipse((x, y, x + 6, y + 6), fill=shade)
    for shape, colour, place in things:
        fx, fy = WHERE[place]
        cx, cy = (fx + rng.uniform(-0.015, 0.015)) * big, (fy + rng.uniform(-0.015, 0.015)) * big
        half = rng.uniform(0.10, 0.12) * big
        outline = tuple(c // 2 for c in SHADES[colour])
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            pen.ellipse(box, fill=SHADES[colour], outline=outline, width=SCALE * 2)
        elif shape == "square":
            pen.rectangle(box, fill=SHADES[colour], outline=outline, width=SCALE * 2)
        else:
            pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)],
                        fill=SHADES[colour], outline=outline, width=SCALE * 2)
    return image.resize((SIDE, SIDE), Image.Resampling.LANCZOS)


def questions() -> list[tuple[Image.Image, str, str]]:
    """24 (picture, question, answer): 8 colour, 8 count, 8 shape-at, fixed by the seed."""
    rng = random.Random(2024)
    out: list[tuple[Image.Image, str, str]] = []
    kinds = ["color"] * 8 + ["count"] * 8 + ["shape_at"] * 8
    for kind in kinds:
        n = rng.randint(1, 3)
        places = rng.sample(list(WHERE), n)
        things = [(rng.choice(("circle", "square", "triangle")), rng.choice(list(SHADES)), p)
                  for p in places]
        picture = paint(things, rng)
        shapes = [t[0] for t in things]
        if kind == "color":
            once = [t for t in things if shapes.count(t[0]) == 1]
            shape, colour, _ = rng.choice(once) if once else things[0]
            if not once:  # every shape twice: ask about a picture with that one only
                things = [things[0]]
                picture = paint(things, rng)
            out.append((picture, f"What color is the {shape}?", f"{colour.capitalize()}."))
        elif kind == "count":
            out.append((picture, "How many shapes are there?", f"{NUMBERS[n - 1]}."))
        else:
            shape, _, place = rng.choice(things)
            out.append((picture, f"What shape is {PHRASE[place]}?", f"A {shape}."))
    return out


def main(folders: list[str]) -> None:
    from owl2_edge.model_dir import demo_folder
    from owl2_edge.owl2 import Owl2
    items = questions()
    for folder in folders or [str(demo_folder() / "model")]:
        right = 0
        with Owl2.load(Path(folder), device="cpu") as owl:
            for picture, question, answer in items:
                got = owl.ask(picture, question, temperature=0, max_tokens=16)
                right += got == answer
                if got != answer:
                    print(f"  {question} -> {got!r} (expected {answer!r})")
        print(f"{folder}: {right}/{len(items)}")


if __name__ == "__main__":
    main(sys.argv[1:])
