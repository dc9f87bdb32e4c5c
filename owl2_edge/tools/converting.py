"""The CLI's way to the converter (owl2_edge.convert, which needs torch & co.): `owl2 convert`
and building the demo model from the committed checkpoint. The runtime never comes here."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from owl2_edge.errors import Owl2Error
from owl2_edge.names import MANIFEST_FILE

# The demo model's decoder type: its answers at Q8_0 are those of F32 (docs/quantize.md).
DEMO_QUANT = "Q8_0"
DEMO_VISION = ("fp32",)


def converter():
    """owl2_edge.convert.converter, or a one-line error saying how to install what it needs."""
    from owl2_edge.convert import missing_package
    missing = missing_package()
    if missing:
        raise Owl2Error(f"converting needs the converter's packages ({missing} is missing): "
                        f"pip install 'owl2-edge[convert]'")
    from owl2_edge.convert import converter as module
    return module


def convert(hf_dir: Path, out_dir: Path, quant: str, vision, force: bool, importance=None,
            progress=None, overrides=()):
    """A checkpoint folder (or Hub id) -> a model folder; its Manifest. overrides: per-tensor
    types (owl2_edge/recipe.py): the checkpoint is converted at full precision into a hidden
    folder beside the output, then quantized from there as `owl2 quantize` does (the same
    bytes as converting, then quantizing)."""
    module = converter()
    if not overrides:
        return module.convert(hf_dir, out_dir, quant=quant, vision=tuple(vision), force=force,
                              progress=progress, importance=importance)
    from dataclasses import replace
    from owl2_edge.model_dir import check_output_folder
    from owl2_edge.quant import check_quant
    from owl2_edge.tools.quantize import quantize_folder
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force)
    full = "F32" if check_quant(quant) == "F32" else "F16"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        converted = module.convert(hf_dir, Path(tmp) / full, quant=full, vision=tuple(vision), force=True,
                       progress=progress)
        manifest = quantize_folder(Path(tmp) / full, out_dir, quant, importance=importance,
                                   force=force, progress=progress, overrides=overrides)
    manifest = replace(manifest, source=converted.source)
    manifest.write(out_dir)
    return manifest


def ensure_demo_model(folder: Path, rebuild: bool = False,
                      on_build: Callable[[], object] = lambda: None,
                      progress=None) -> Path:
    """The demo model folder, converted from the committed checkpoint when it is missing, was
    converted from another version of the checkpoint, or `rebuild`. on_build() is called before
    a conversion starts (to say so); progress(stage, done, total) reports it."""
    converter()
    from owl2_edge.convert import DEMO_CHECKPOINT as checkpoint
    stamp = folder / "checkpoint.sha256"
    digest = _folder_digest(checkpoint)
    model = folder / "model"
    if rebuild or not (model / MANIFEST_FILE).is_file() or not stamp.is_file() \
            or stamp.read_text().strip() != digest:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        on_build()
        convert(checkpoint, model, DEMO_QUANT, DEMO_VISION, force=True, progress=progress)
        stamp.write_text(digest + "\n")
    return model


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
