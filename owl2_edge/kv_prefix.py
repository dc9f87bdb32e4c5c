"""A prompt as the KV cache sees it, item by item, so that a new prompt re-evaluates only what
differs from what a sequence holds (docs/design.md §4.2).

A prompt (and what each sequence of the cache holds) is a list of items in position order:
("t", token_id) for a text token, ("i", content_hash) for a whole image (n_visual positions).
A prompt whose items start like a sequence's keeps that prefix (the engine, engine/scheduler.py);
the rest is evaluated in passes of runs, each run one modality (text ids, or one image's
embeddings) and route.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from owl2_edge import names
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


def check_fits(items: Sequence[Item], n_visual: int, window: int, n_ctx: int) -> None:
    """ContextFullError when a prompt's items need more positions than an answer may hold
    (`window`: n_ctx, or its share when answers run in parallel). The one fit check: Owl2.prepare
    refuses with it before reading an image, the engine again at submit (a prompt prepared for
    another window), Owl2.logits against the whole context."""
    needed = positions(items, n_visual)
    if needed > window:
        n_images = sum(1 for kind, _ in items if kind == IMAGE)
        shared = f" (n_ctx {n_ctx} shared by parallel answers)" if window < n_ctx else ""
        raise ContextFullError(
            f"the prompt needs {needed} positions ({len(items) - n_images} tokens + "
            f"{n_images} image(s) x {n_visual}) but an answer may hold {window}{shared}; "
            f"shorten it, or load with a larger n_ctx (or a smaller parallel)")


def common_prefix(items: Sequence[Item], cached: Sequence[Item]) -> int:
    """How many items at the start of `items` `cached` has too; never all of them: the last
    position must run again, its logits start the answer. The one prefix scan: the engine
    chooses the sequence to start from with it, and how far the disk cache must reach."""
    n, limit = 0, min(len(items) - 1, len(cached))
    while n < limit and items[n] == cached[n]:
        n += 1
    return n


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
