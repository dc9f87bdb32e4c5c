"""The demo's sample pictures, drawn in code (no binary in the repo), and what `owl2 demo` asks.

They are scenes of the kind the demo model was trained on (owl2_edge/scenes.py), with layouts
from the held-out split: the model never saw these arrangements of shapes during training.
"""

from PIL import Image

from owl2_edge.scenes import Scene, Thing

SAMPLES = (
    Scene((Thing("triangle", "red", "left"), Thing("square", "blue", "right"),
           Thing("circle", "yellow", "top")), seed=11),
    Scene((Thing("circle", "green", "center"), Thing("square", "purple", "bottom")), seed=12),
)
# The picture size the samples are drawn at (the runtime resizes them to the model's).
SAMPLE_SIZE = 336


def sample_image(index: int = 0) -> Image.Image:
    return SAMPLES[index].draw(SAMPLE_SIZE)


def sample_questions(index: int = 0) -> list[tuple[str, str]]:
    """(question, expected answer) pairs for one sample: one colour, the count, one place."""
    by_kind = {}
    for q in SAMPLES[index].questions():
        by_kind.setdefault(q.kind, (q.text, q.answer))
    return list(by_kind.values())
