"""What the decoder's KV cache holds, item by item, so that a new prompt re-evaluates only what
differs from the last one (docs/design.md §4.2).

The cache is described as a list of items in position order: ("t", token_id) for a text token,
("i", content_hash) for a whole image (n_visual positions). A prompt whose items start like the
cached ones keeps that prefix; the rest is rewound and evaluated in one pass of runs, each run
one modality (text ids, or one image's embeddings) and route.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from owl2_edge import names
from owl2_edge.decoder import Decoder
from owl2_edge.errors import ContextFullError

TEXT, IMAGE = "t", "i"
Item = tuple[str, object]


def prompt_items(ids: Sequence[int], image_keys: Sequence[str]) -> list[Item]:
    """Token ids (names.IMAGE_TOKEN_ID where each image goes) -> items, the images named by key."""
    items, k = [], 0
    for t in ids:
        if t == names.IMAGE_TOKEN_ID:
            items.append((IMAGE, image_keys[k]))
            k += 1
        else:
            items.append((TEXT, t))
    return items


def width(item: Item, n_visual: int) -> int:
    """The cache positions an item takes: n_visual for an image, 1 for a token."""
    return n_visual if item[0] == IMAGE else 1


def positions(items: Sequence[Item], n_visual: int) -> int:
    """The cache positions of a run of items."""
    return sum(width(item, n_visual) for item in items)


def runs_of(items: Sequence[Item], embeds: Sequence[np.ndarray], first_image: int = 0) -> list:
    """Items -> the decoder's runs: each stretch of text as a list of ids, each image as its
    embeddings (embeds[first_image] is the first image's among these items)."""
    runs, image_index, rest = [], first_image, list(items)
    while rest:
        if rest[0][0] == IMAGE:
            runs.append(np.asarray(embeds[image_index], dtype=np.float32))
            image_index, rest = image_index + 1, rest[1:]
        else:
            n = next((k for k, item in enumerate(rest) if item[0] == IMAGE), len(rest))
            runs.append([value for _, value in rest[:n]])
            rest = rest[n:]
    return runs


class KVPrefix:
    """The decoder's cache and its description, kept in agreement."""

    def __init__(self, decoder: Decoder, n_visual: int):
        self.decoder, self.n_visual = decoder, n_visual
        self.cached: list[Item] = []

    def width(self, item: Item) -> int:
        return width(item, self.n_visual)

    def check_fits(self, items: Sequence[Item]) -> None:
        needed = positions(items, self.n_visual)
        if needed > self.decoder.n_ctx:
            n_images = sum(1 for kind, _ in items if kind == IMAGE)
            raise ContextFullError(
                f"the prompt needs {needed} positions ({len(items) - n_images} tokens + "
                f"{n_images} image(s) x {self.n_visual}) but the context holds "
                f"{self.decoder.n_ctx}; shorten it or load with a larger n_ctx")

    def prefill(self, items: list[Item], embeds: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        """Make the cache hold exactly `items`, evaluating only what it lacks; return the last
        position's logits and how many positions were reused. embeds[k]: the k-th image's."""
        self.check_fits(items)
        keep = 0
        while keep < min(len(items), len(self.cached)) and items[keep] == self.cached[keep]:
            keep += 1
        if keep == len(items) and keep:
            keep -= 1  # the last position must run again: its logits start the answer
        self.forget(keep)
        reused = self.decoder.n_past
        first_image = sum(1 for kind, _ in items[:keep] if kind == IMAGE)
        return self.evaluate(items[keep:], embeds, first_image), reused

    def extend(self, items: list[Item]) -> int:
        """Make the cache start with `items` (text only), evaluating what it lacks of them and
        keeping whatever it holds after them when they are all there already: a head start on
        a prompt that begins with them, while its images are still being encoded. Returns the
        positions it evaluated."""
        keep = 0
        while keep < min(len(items), len(self.cached)) and items[keep] == self.cached[keep]:
            keep += 1
        if keep == len(items):
            return 0
        self.forget(keep)
        self.evaluate(items[keep:], [])
        return len(items) - keep

    def evaluate(self, items: list[Item], embeds: Sequence[np.ndarray], first_image: int = 0,
                 all_logits: bool = False) -> np.ndarray:
        """Append items to the cache in one pass of the decoder (its runs of text and images
        together: Decoder.eval_runs) and return the last position's logits, or every
        position's. They are recorded once the decoder holds them; an interruption leaves the
        decoder ahead of the description, which forget() measures from the decoder's n_past."""
        logits = self.decoder.eval_runs(runs_of(items, embeds, first_image), all_logits=all_logits)
        self.cached.extend(items)
        return logits

    def append_token(self, token: int) -> np.ndarray:
        """One decode step: the token's logits, the token now cached."""
        logits = self.decoder.eval_tokens([token])
        self.cached.append((TEXT, token))
        return logits

    def forget(self, keep_items: int) -> None:
        """Rewind the cache to its first keep_items items."""
        keep_positions = positions(self.cached[:keep_items], self.n_visual)
        self.decoder.rewind(self.decoder.n_past - keep_positions)
        self.cached = self.cached[:keep_items]
