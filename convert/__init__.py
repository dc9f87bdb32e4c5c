"""The converter: Hugging Face mPLUG-Owl2 checkpoint -> owl2-edge model folder.

Everything under here may import torch; the runtime (the rest of owl2_edge) never imports this
package except lazily for `owl2 convert` and `owl2 demo`. Importing this package itself is
cheap and needs none of them: the CLI asks it what is missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# What the converter imports beyond the runtime (the `convert` extra of pyproject.toml).
REQUIRED_PACKAGES = ("torch", "sentencepiece", "safetensors")

# The trained demo model's checkpoint (release layout, bfloat16), written by train_demo.py and
# committed; `owl2 demo` converts it (docs/design.md §10).
DEMO_CHECKPOINT = Path(__file__).parent / "demo_model"


def missing_package() -> str | None:
    """The first converter package that cannot be imported, or None. (Imported, not only looked
    up: the converter is about to use them anyway, and a broken install must count as missing.)"""
    for name in REQUIRED_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None
