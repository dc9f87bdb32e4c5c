"""The named shapes `owl2 bench --shape` measures, each built once into a cached model folder.

The table of shapes is the tiny-checkpoint generator's (owl2_edge.convert.tiny.SHAPES: "7b" is
the release's shape, "1b" a ViT-B + 1B-decoder one; "tiny" is for the tests). A shape is written
as a random checkpoint in the release's layout, converted by the converter's own code, and kept
under $OWL2_BENCH_CACHE, else ~/.cache/owl2-edge/bench:

    <shape>-<quant>/
      model/        the model folder: the decoder pair in `quant`, vision int8, fp32 and fp16
      shape.json    the shape's config.json and preprocessor_config.json, from which the
                    workers build the PyTorch reference vision (random weights too)

Random weights are fine for speed and memory: those depend on the shapes and the types, not on
the values (every decode here is greedy, and --ignore-eos keeps answers at full length).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from owl2_edge import names
from owl2_edge.errors import ArgumentError, Owl2Error
from owl2_edge.model_dir import cache_folder, staged_folder

CACHE_ENV = "OWL2_BENCH_CACHE"
# What `owl2 bench --shape` offers; tiny.SHAPES also has "tiny", which only the tests build.
ADVERTISED_SHAPES = ("7b", "1b")
DEFAULT_QUANT = "Q4_K_M"
# Every vision file the vision rows compare: the CPU's pick, the exact one, the GPU's pick.
VISION_VARIANTS = ("int8", "fp32", "fp16")
MODEL_SUBFOLDER = "model"
SHAPE_FILE = "shape.json"

# progress(stage, done, total), as the converter's.
Progress = Callable[[str, int, int], None]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or cache_folder() / "bench")


def shape_config_file(model: Path) -> Path | None:
    """The shape.json beside a model folder that shape_folder built, or None for any other."""
    path = Path(model).parent / SHAPE_FILE
    return path if path.is_file() else None


def shape_folder(shape: str, quant: str = DEFAULT_QUANT, cache: Path | None = None,
                 progress: Progress | None = None) -> Path:
    """The model folder of a named shape with the decoder in `quant`: built on the first call
    (minutes and, at 7B, 16 GB of temporary disk), found in the cache afterwards. Rebuilt when
    the cached entry was made from another definition of the shape."""
    from owl2_edge.quant import check_quant  # gguf-py & co.: only when a shape is asked for
    tiny = _generator()
    if shape not in tiny.SHAPES:
        raise ArgumentError(f"unknown shape {shape!r}; choose one of {', '.join(ADVERTISED_SHAPES)}")
    quant = check_quant(quant)
    config = tiny.SHAPES[shape]()
    entry = (cache or cache_root()) / f"{shape}-{quant}"
    described = _describe(config)
    if not _is_cached(entry, described):
        # Built in a hidden folder renamed at the end: an interrupted build is never taken for
        # a cached one.
        with staged_folder(entry) as work:
            _build(work, config, quant, progress)
            (work / SHAPE_FILE).write_text(json.dumps(described, indent=1) + "\n")
    return entry / MODEL_SUBFOLDER


def _generator():
    """owl2_edge.convert.tiny, or a one-line error: building a shape needs torch."""
    from owl2_edge.convert import missing_package
    missing = missing_package()
    if missing:
        raise Owl2Error(f"--shape builds a model, which needs the converter's packages ({missing} "
                        f"is missing): pip install 'owl2-edge[convert]', or pass -m MODEL_DIR")
    from owl2_edge.convert import tiny
    return tiny


def _describe(config) -> dict:
    return {"config": config.to_config_dict(), "preprocessor": config.to_preprocessor_dict()}


def _is_cached(entry: Path, described: dict) -> bool:
    model, shape = entry / MODEL_SUBFOLDER, entry / SHAPE_FILE
    if not (model / names.MANIFEST_FILE).is_file() or not shape.is_file():
        return False
    try:
        return json.loads(shape.read_text()) == described
    except (OSError, ValueError):
        return False


def _build(work: Path, config, quant: str, progress: Progress | None) -> None:
    from owl2_edge.convert import hf_layout, tiny
    from owl2_edge.convert.converter import convert
    report = progress or (lambda stage, done, total: None)
    # The checkpoint goes inside the hidden work folder, on the cache's disk (16 GB at 7B: more
    # than a RAM-backed /tmp may hold), and is deleted as soon as it is converted.
    checkpoint = work / "checkpoint"
    n_shards = len(hf_layout.release_shard_plan(config))
    written: list[str] = []

    def on_shard(file: str) -> None:
        written.append(file)
        report("weights", len(written), n_shards)

    report("weights", 0, n_shards)
    tiny.make_tiny_checkpoint(checkpoint, config=config, seed=0, on_file=on_shard)
    convert(checkpoint, work / MODEL_SUBFOLDER, quant=quant, vision=VISION_VARIANTS,
            progress=report)
    shutil.rmtree(checkpoint)
