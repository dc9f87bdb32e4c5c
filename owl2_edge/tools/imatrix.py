"""Importance matrices seen through the MAM decoder (`owl2 imatrix`, docs/design.md §11).

    im = collect(owl, calibration_prompts(64))   # runs each prompt, image and all
    im.write("imatrix.gguf")                      # llama.cpp's imatrix GGUF
    ImportanceMatrix.read("imatrix.gguf").for_base()

An importance matrix holds, for every weight matrix, the mean of its squared inputs per column;
the k- and i-quants spend their precision on the columns whose inputs are large. llama.cpp
collects one from text alone. Here the decoder runs the prompts with their images, so each
matrix sees the positions that really go through it: the shared matrices (Q, O, the MLP, the
output head) every position, the base's text-route K/V the text positions, and the sidecar's
visual K/V the image positions only (a text-only set leaves those empty).

The file is llama.cpp's imatrix GGUF (its llama-quantize reads it for the base file); the
sidecar's entries carry gguf_names.IMATRIX_MAM_PREFIX before the base's names.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from owl2_edge import checks, gguf_names, outputs, scenes, textfiles
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError
from owl2_edge.prompt import Turn, render

# Pictures of the built-in set are drawn at this size (the runtime resizes them to the model's).
CALIBRATION_DRAW_SIZE = 224
DEFAULT_PROMPTS = 64
# A 7B model's imatrix is a few MiB (one float per input column of each matrix, and a count).
MAX_IMATRIX_BYTES = 2**30


@dataclass(frozen=True)
class Prompt:
    """One calibration prompt: the whole text the decoder runs (template included) and its image
    (None for a text-only prompt)."""
    text: str
    image: object = None


@dataclass
class Entry:
    sum_sq: np.ndarray   # float32 [n_per_row]
    count: int           # positions summed

    def mean(self) -> np.ndarray:
        return (self.sum_sq / max(self.count, 1)).astype(np.float32)


@dataclass
class ImportanceMatrix:
    base: dict[str, Entry] = field(default_factory=dict)   # the base file's matrices, by GGUF name
    mam: dict[str, Entry] = field(default_factory=dict)    # the sidecar's, by their GGUF name
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0     # prompts run
    chunk_size: int = 0      # positions of the longest prompt

    def for_base(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer takes for the base: name -> mean squared input."""
        return {name: e.mean() for name, e in self.base.items() if e.count}

    def for_sidecar(self) -> dict[str, np.ndarray]:
        return {name: e.mean() for name, e in self.mam.items() if e.count}

    # -- the file --------------------------------------------------------------------------------

    def write(self, path: str | os.PathLike, replace: bool = False) -> Path:
        """Write llama.cpp's imatrix GGUF, under its final name only when complete
        (owl2_edge/outputs.py: a folder or a device is refused; an existing file is replaced
        only with replace=True)."""
        import gguf

        with outputs.replacing(path, replace) as part:
            with contextlib.closing(gguf.GGUFWriter(part, gguf_names.IMATRIX_GENERAL_TYPE)) as w:
                w.add_type(gguf_names.IMATRIX_GENERAL_TYPE)
                w.add_array(gguf_names.KEY_IMATRIX_DATASETS, self.datasets or ["owl2-edge"])
                w.add_uint32(gguf_names.KEY_IMATRIX_CHUNK_COUNT, self.chunk_count)
                w.add_uint32(gguf_names.KEY_IMATRIX_CHUNK_SIZE, self.chunk_size)
                for prefix, entries in (("", self.base), (gguf_names.IMATRIX_MAM_PREFIX, self.mam)):
                    for name, e in sorted(entries.items()):
                        if not e.count:
                            continue
                        w.add_tensor(prefix + name + gguf_names.IMATRIX_SUM_SUFFIX,
                                     np.asarray(e.sum_sq, np.float32).reshape(1, -1))
                        w.add_tensor(prefix + name + gguf_names.IMATRIX_COUNT_SUFFIX,
                                     np.array([[e.count]], np.float32))
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ImportanceMatrix":
        """Read an imatrix GGUF (ours, or llama.cpp's: its entries then all go to the base).
        Anything else is an ArgumentError naming the file."""
        path = textfiles.regular_file("imatrix", path, MAX_IMATRIX_BYTES,
                                      "importance matrix file")
        shown = display_path(path)
        try:
            with open(path, "rb") as f:
                _check_layout(f, shown)
            return cls._read(path, shown)
        except ArgumentError:
            raise
        except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError...
            raise ArgumentError(f"{shown}: not a GGUF importance matrix "
                                f"({e.__class__.__name__})") from None

    @classmethod
    def _read(cls, path: Path, shown: str) -> "ImportanceMatrix":
        import gguf

        reader = gguf.GGUFReader(path)
        kind = reader.fields.get(gguf_names.KEY_GENERAL_TYPE)
        if kind is None or kind.contents() != gguf_names.IMATRIX_GENERAL_TYPE:
            raise ArgumentError(f"{shown}: not an importance matrix (general.type is not "
                                f"{gguf_names.IMATRIX_GENERAL_TYPE!r}); make one with `owl2 imatrix`")
        tensors = {t.name: t for t in reader.tensors}
        datasets = _field(reader, gguf_names.KEY_IMATRIX_DATASETS, [])
        if isinstance(datasets, str):
            datasets = [datasets]
        if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
            raise ArgumentError(f"{shown}: {gguf_names.KEY_IMATRIX_DATASETS} is not a list of text")
        out = cls(datasets=datasets,
                  chunk_count=_count_field(reader, gguf_names.KEY_IMATRIX_CHUNK_COUNT, shown),
                  chunk_size=_count_field(reader, gguf_names.KEY_IMATRIX_CHUNK_SIZE, shown))
        for name, t in tensors.items():
            if not name.endswith(gguf_names.IMATRIX_SUM_SUFFIX):
                continue
            weight = name[:-len(gguf_names.IMATRIX_SUM_SUFFIX)]
            counts = tensors.get(weight + gguf_names.IMATRIX_COUNT_SUFFIX)
            sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if counts is None or np.asarray(counts.data).size != 1:
                # Several counts are a mixture-of-experts matrix: not a LLaMA's.
                raise ArgumentError(f"{shown}: {weight} has no single count")
            count = float(np.asarray(counts.data, dtype=np.float64).reshape(-1)[0])
            # Sums of squares and counts are never negative: a file that says so is damaged,
            # and NaN or infinity would reach the quantizer's weighting as they are.
            if not np.isfinite(sums).all() or (sums < 0).any() or not np.isfinite(count) \
                    or count < 0:
                raise ArgumentError(f"{shown}: {weight} holds NaN, infinite or negative values")
            if weight.startswith(gguf_names.IMATRIX_MAM_PREFIX):
                out.mam[weight[len(gguf_names.IMATRIX_MAM_PREFIX):]] = Entry(sums, int(count))
            else:
                out.base[weight] = Entry(sums, int(count))
        if not out.base:
            raise ArgumentError(f"{shown}: holds no entries")
        return out


# What an imatrix GGUF declares, bounded before gguf-py reads it: its reader loops in Python over
# every key, array element and tensor declared, so one damaged count (2**62) would never end.
# An imatrix has a handful of keys, a short list of dataset names, and two tensors per matrix.
_MAX_KEYS = 256
_MAX_ARRAY_ITEMS = 65_536     # all arrays together
_MAX_TENSORS = 65_536
_MAX_STRING = 2**20
_MAX_DIMS = 4                 # GGML_MAX_DIMS
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_layout(f, shown: str) -> None:
    """Walk a GGUF's header, keys and tensor list (little-endian, versions 2 and 3) and refuse
    counts beyond the bounds above, before gguf-py's reader runs."""
    def take(n: int) -> bytes:
        b = f.read(n)
        if len(b) < n:
            raise ArgumentError(f"{shown}: not a GGUF importance matrix (truncated)")
        return b

    def number(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def too_many(what: str) -> ArgumentError:
        return ArgumentError(f"{shown}: not an importance matrix ({what})")

    def string() -> None:
        n = number("Q")
        if n > _MAX_STRING:
            raise too_many(f"a {n}-byte string")
        take(n)

    items = 0

    def value(kind: int, nested: bool) -> None:
        nonlocal items
        if kind == _GGUF_STRING:
            string()
        elif kind == _GGUF_ARRAY and not nested:
            inner, count = number("I"), number("Q")
            items += count
            if items > _MAX_ARRAY_ITEMS:
                raise too_many(f"arrays of more than {_MAX_ARRAY_ITEMS} items")
            for _ in range(count):
                value(inner, True)
        elif kind in _GGUF_SCALAR_SIZES:
            take(_GGUF_SCALAR_SIZES[kind])
        else:
            raise ArgumentError(f"{shown}: not a GGUF importance matrix (value type {kind})")

    if take(4) != b"GGUF":
        raise ArgumentError(f"{shown}: not a GGUF importance matrix (no GGUF magic)")
    version = number("I")
    if version not in (2, 3):
        raise ArgumentError(f"{shown}: not a GGUF importance matrix (version {version})")
    n_tensors, n_keys = number("Q"), number("Q")
    if n_keys > _MAX_KEYS or n_tensors > _MAX_TENSORS:
        raise too_many(f"{n_keys} keys, {n_tensors} tensors")
    for _ in range(n_keys):
        string()
        value(number("I"), False)
    for _ in range(n_tensors):
        string()
        n_dims = number("I")
        if n_dims > _MAX_DIMS:
            raise too_many(f"a tensor of {n_dims} dimensions")
        take(8 * n_dims + 4 + 8)  # dimensions, type, offset


def _count_field(reader, key: str, shown: str) -> int:
    value = _field(reader, key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**63:
        raise ArgumentError(f"{shown}: {key} is not a count")
    return int(value)


def _field(reader, key: str, default):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# --- Calibration prompts ----------------------------------------------------------------------------

def calibration_prompts(n: int = DEFAULT_PROMPTS, seed: int = 0) -> list[Prompt]:
    """The built-in set: n generated pictures of shapes (owl2_edge/scenes.py, training layouts,
    so held-out evaluations stay unseen), each with one of its questions and the answer, as the
    template renders a finished turn."""
    n = checks.integer("n", n, 1, 100_000)
    rng = random.Random(checks.integer("seed", seed, 0, 2**32 - 1))
    out = []
    for _ in range(n):
        scene = scenes.random_scene(rng, "train")
        q = rng.choice(scene.questions())
        text = render([Turn(q.text)], n_images=1) + " " + q.answer
        out.append(Prompt(text, scene.draw(CALIBRATION_DRAW_SIZE)))
    return out


def prompts_from_items(items: Sequence) -> list[Prompt]:
    """owl2_edge.tools.evaluate.Items (a JSONL file's lines) as calibration prompts: the question in the
    template, followed by the first answer when the line gives one."""
    out = []
    for item in items:
        text = render([Turn(item.question)], n_images=0 if item.image is None else 1)
        if item.answers:
            text += " " + item.answers[0]
        out.append(Prompt(text, item.image))
    return out


# --- Collecting -------------------------------------------------------------------------------------

def collect(owl, prompts: Sequence[Prompt], dataset: str = "owl2-edge built-in scenes",
            on_progress: Callable[[int, int], None] | None = None) -> ImportanceMatrix:
    """Run every prompt through `owl` (an Owl2) from an empty cache and gather what each weight
    matrix's inputs add up to."""
    if not prompts:
        raise ArgumentError("no calibration prompts")
    out = ImportanceMatrix(datasets=[dataset])
    owl.decoder.start_importance()
    try:
        for i, p in enumerate(prompts):
            logits = owl.logits(p.text, [] if p.image is None else [p.image])
            out.chunk_count += 1
            out.chunk_size = max(out.chunk_size, len(logits))
            if on_progress:
                on_progress(i + 1, len(prompts))
    finally:
        collected = owl.decoder.take_importance()
    suffix = gguf_names.VISUAL_WEIGHT_SUFFIX
    for name, (sum_sq, count) in collected.items():
        if name.endswith(suffix):
            out.mam[name[:-len(suffix)]] = Entry(np.asarray(sum_sq), int(count))
        else:
            out.base[name] = Entry(np.asarray(sum_sq), int(count))
    return out
