"""A conversation with history: each send() is a turn, images join with add_image().

The prompt of turn n starts with turn n-1's, so Owl2's KV prefix reuse evaluates only the new
turn (docs/design.md §4.2). Owl2.chat makes one over its Owl2.generate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from owl2_edge import clips, names
from owl2_edge.errors import PromptError
from owl2_edge.image import load_image
from owl2_edge.prompt import Turn, before_question, render
from owl2_edge.sampling import SamplingParams
from owl2_edge.stats import Stats

if TYPE_CHECKING:
    from owl2_edge.engine import Job, Pieces

# What answers a turn: Owl2.generate (a templated prompt, its images, sampling -> its Pieces).
Generate = Callable[[str, Sequence, SamplingParams], "Pieces"]
# What reads a prompt's beginning ahead: Owl2.warm_prompt (the beginning, its images -> a Job).
Warm = Callable[[str, Sequence], "Job"]


class Chat:
    """Images added with add_image() are placed in the next question. warm: Owl2.warm_prompt;
    with it, the next question's beginning (the pictures given, the history) is read ahead as
    soon as a picture is given, while the user types (docs/api.md, "Warming")."""

    def __init__(self, generate: Generate, images: list, warm: Warm | None = None):
        self.generate = generate
        self.turns: list[Turn] = []
        self.images: list = []
        self._new_images: list = list(images)
        self.stats = Stats()  # the last turn's answer's (its counts fill in as it is read)
        self._warm, self.warming = warm, None  # the warm of the next question, if any
        self._read_ahead()

    def add_image(self, image) -> None:
        """A picture, or a clip (clips.py: its frames, one image slot each)."""
        # Read now, to fail with the file's name rather than at the next question (a clip's
        # frames are kept, so the question does not decode them again).
        if clips.clip_kind(image) is not None:
            clips.read_frames(image if isinstance(image, clips.Clip) else clips.Clip(image))
        else:
            load_image(image)
        self._new_images.append(image)
        self._read_ahead()

    def clear(self) -> None:
        self.turns, self.images, self._new_images = [], [], []
        self._read_ahead()

    def _read_ahead(self) -> None:
        """Warm the next question's beginning when it holds a picture not yet asked about; the
        previous warm, if still going, is dropped (its pictures changed)."""
        if self.warming is not None:
            self.warming.cancel()
            self.warming = None
        if self._warm is None or not self._new_images:
            return
        images = self.images + self._new_images
        prefix = before_question([*self.turns, Turn(names.IMAGE_PLACEHOLDER *
                                                    len(self._new_images))], n_images=len(images))
        self.warming = self._warm(prefix, images)

    def send(self, question: str, **sampling) -> Iterator[str]:
        if names.IMAGE_PLACEHOLDER in question:
            raise PromptError(f"in a chat, add images with add_image (/image), not {names.IMAGE_PLACEHOLDER}")
        turn = Turn(names.IMAGE_PLACEHOLDER * len(self._new_images) + question)
        images = self.images + self._new_images
        prompt = render([*self.turns, turn], n_images=len(images))
        pieces = self.generate(prompt, images, SamplingParams.of(sampling))
        self.stats = pieces.stats
        answer: list[str] = []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:
            # An interrupted answer (Ctrl-C, the caller stopped reading) stays in the history as
            # far as it got, as in a chat window.
            self.turns.append(Turn(turn.user, "".join(answer)))
            self.images, self._new_images = images, []
