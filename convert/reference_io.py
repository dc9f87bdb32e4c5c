"""Reference image preprocessing and prompt tokenization, written from docs/architecture.md §6 and §7.

These mirror what upstream gets from transformers (CLIPImageProcessor, the slow LlamaTokenizer
with legacy=True) without depending on transformers: they are the oracle for the runtime's own
numpy preprocessing and its llama.cpp-vocab tokenizer.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from owl2_edge.convert.config import PreprocessConfig
from owl2_edge.names import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

ASPECT_MODES = ("pad", "resize", "crop")


# ================================================================================================
# Images (docs/architecture.md §6)
# ================================================================================================

def preprocess(image: Image.Image, cfg: PreprocessConfig, mode: str = "pad") -> np.ndarray:
    """One image -> pixels float32 [3, S, S].

    pad    : the CLI's default; square canvas in the pad colour, image centred on the short axis
    resize : README / evaluate scripts; PIL bicubic stretch to a max(W, H) square
    crop   : plain CLIP processor (shortest edge to S, centre crop); model_worker's path
    """
    if mode not in ASPECT_MODES:
        raise ValueError(f"unknown aspect mode {mode!r}; expected one of {ASPECT_MODES}")
    image = image.convert("RGB")
    if mode == "pad":
        image = pad_to_square(image, cfg.pad_color)
    elif mode == "resize":
        side = max(image.size)
        # Image.resize's default filter for RGB is bicubic, which upstream relies on.
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return clip_process(image, cfg)


def pad_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Upstream's expand2square: offset (long - short) // 2 on the short axis (floor)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_process(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """transformers' CLIPImageProcessor with the release's preprocessor_config.json:
    convert RGB, shortest edge -> S (long edge int(S·long/short), floored) with PIL bicubic back to
    uint8, centre crop S×S, rescale by 1/255, normalise, HWC -> CHW."""
    s = cfg.image_size
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = s, int(s * h / w)
    else:
        new_w, new_h = int(s * w / h), s
    # Pillow's bicubic (a = -0.5, support scaled when shrinking = antialiased), uint8 output:
    # the rounding to uint8 here is part of the result; torch/OpenCV bicubic would not match.
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    top, left = (new_h - s) // 2, (new_w - s) // 2
    pixels = pixels[top:top + s, left:left + s]
    # transformers rescales in float64 then casts to float32, and normalises in float32.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# ================================================================================================
# Prompts (docs/architecture.md §7)
# ================================================================================================

# The special tokens the slow LlamaTokenizer matches in raw text (its all_special_tokens).
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TEXTS) + ")")


def encode_text(sp, text: str) -> list[int]:
    """The slow LlamaTokenizer's `tokenize` + ids for one string, no BOS (legacy=True).

    A literal special token in the text is its id, and (the legacy behaviour) the text on either
    side of it is encoded as its own sentencepiece call, so the text after `</s>` gets its own
    dummy-prefix "▁" again: "</s>USER" -> [2, ▁USER...]. Whitespace next to a special token is
    kept (the release's AddedTokens have lstrip/rstrip false).
    """
    ids: list[int] = []
    for part in _SPECIAL_SPLIT.split(text):
        if not part:
            continue
        if part in SPECIAL_TEXTS:
            ids.append(sp.piece_to_id(part))
        else:
            ids.extend(sp.encode(part))
    return ids


def tokenize(sp, prompt: str, bos_id: int = 1) -> list[int]:
    """Upstream's tokenizer_image_token: prompt text -> ids with IMAGE_TOKEN_ID per image.

    The prompt is split on the image placeholder and each chunk is tokenized ON ITS OWN, with BOS
    and sentencepiece's dummy prefix, so "USER: " before an image ends in a standalone "▁" and the
    text after it starts with a "▁"-prefixed piece although the string has no space there. Only
    the first chunk's BOS is kept; empty chunks give nothing. Quirk kept on purpose: when the
    prompt starts with the image, the first chunk is empty and the BOS that survives is the
    second chunk's, after the image ([-200, 1, ...]).
    """
    chunks = [[bos_id, *encode_text(sp, c)] if c else [] for c in prompt.split(IMAGE_PLACEHOLDER)]
    ids: list[int] = []
    keep_bos = bool(chunks[0])  # upstream: first chunk non-empty and starting with BOS
    if keep_bos:
        ids.append(bos_id)
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        ids.extend(chunk[1:] if keep_bos else chunk)
    return ids
