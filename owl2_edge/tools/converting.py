"""The CLI's way to the converter (owl2_edge.convert, which needs torch & co.): `owl2 convert`
and building the demo model from the committed checkpoint. The runtime never comes here."""

from __future__ import annotations

import hashlib
import shutil
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
            progress=None):
    """A checkpoint folder (or Hub id) -> a model folder; its Manifest."""
    return converter().convert(hf_dir, out_dir, quant=quant, vision=tuple(vision), force=force,
                               progress=progress, importance=importance)


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
