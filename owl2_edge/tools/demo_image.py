"""The demo's sample pictures and clip, drawn in code (no binary in the repo), and what `owl2
demo` asks.

They are scenes of the kind the demo model was trained on (owl2_edge/scenes.py), with layouts
from the held-out split: the model never saw these arrangements of shapes during training.
"""

from pathlib import Path

from PIL import Image

from owl2_edge.scenes import Clip, Scene, Thing, json_question

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


def sample_json(index: int = 0) -> tuple[str, str]:
    """(question, expected answer): the picture as JSON (scenes.SCENE_SCHEMA's object)."""
    q = json_question(SAMPLES[index])
    return q.text, q.answer


# A blue triangle moves from the top to the bottom past a red square on the left (a held-out
# layout), in 4 frames.
SAMPLE_CLIP = Clip("move", (Thing("triangle", "blue", "top"), Thing("square", "red", "left")),
                   n_frames=4, seed=21, end_place="bottom")
# How long each frame of the saved GIF shows.
CLIP_FRAME_MS = 500


def sample_clip_frames() -> list[Image.Image]:
    return SAMPLE_CLIP.frames(SAMPLE_SIZE)


def save_sample_clip(path: Path) -> list[Image.Image]:
    """The sample clip as an animated GIF (looping); returns its frames."""
    frames = sample_clip_frames()
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=CLIP_FRAME_MS, loop=0)
    return frames


def sample_clip_question() -> tuple[str, str]:
    q = SAMPLE_CLIP.questions()[0]
    return q.text, q.answer
