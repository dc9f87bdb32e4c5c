"""A conversation with history: each send() is a turn, images join with add_image().

The prompt of turn n starts with turn n-1's, so Owl2's KV prefix reuse evaluates only the new
turn (docs/design.md §4.2). Owl2.chat makes one over its Owl2.generate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from owl2_edge import names
from owl2_edge.errors import PromptError
from owl2_edge.image import load_image
from owl2_edge.prompt import Turn, render
from owl2_edge.sampling import SamplingParams
from owl2_edge.stats import Stats

if TYPE_CHECKING:
    from owl2_edge.engine import Pieces

# What answers a turn: Owl2.generate (a templated prompt, its images, sampling -> its Pieces).
Generate = Callable[[str, Sequence, SamplingParams], "Pieces"]


class Chat:
    """Images added with add_image() are placed in the next question."""

    def __init__(self, generate: Generate, images: list):
        self.generate = generate
        self.turns: list[Turn] = []
        self.images: list = []
        self._new_images: list = list(images)
        self.stats = Stats()  # the last turn's answer's (its counts fill in as it is read)

    def add_image(self, image) -> None:
        load_image(image)  # fail now, with the file's name, rather than at the next question
        self._new_images.append(image)

    def clear(self) -> None:
        self.turns, self.images, self._new_images = [], [], []

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
