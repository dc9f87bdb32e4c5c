"""The model folder's manifest, owl2.json: what `owl2 convert` writes and the runtime reads.

The converter fills a Manifest and calls write(); the runtime calls Manifest.load(folder), which
checks the format and version and that every file it names is there, so a broken folder fails
here with one clear line instead of deep inside ggml or ONNX Runtime.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from owl2_edge import names
from owl2_edge.errors import ModelFolderError


MODEL_ENV = "OWL2_MODEL"


def demo_folder() -> Path:
    """Where `owl2 demo` keeps its generated checkpoint (hf/) and model folder (model/)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "owl2-edge" / "demo"


def default_model_path() -> Path:
    """-m's default: $OWL2_MODEL, then the demo model."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    return demo_folder() / "model"


@dataclass(frozen=True)
class ImageSpec:
    """How pixels are prepared for the vision graph (docs/architecture.md §6)."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pad_color: tuple[int, int, int]


@dataclass(frozen=True)
class DecoderSpec:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ctx_train: int
    bos_id: int
    eos_id: int


@dataclass(frozen=True)
class Manifest:
    decoder_file: str
    mam_file: str
    vision_files: dict[str, str]      # variant ("fp32", "fp16") -> file name
    quant: str                        # the decoder's quantization, as `owl2 convert --quant` took it
    pair_id: str
    n_visual: int                     # embeddings one image puts into the decoder
    image: ImageSpec
    decoder: DecoderSpec
    template: str = names.TEMPLATE_ID
    source: str = ""
    format: str = names.MANIFEST_FORMAT
    version: int = names.MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    def files(self) -> list[str]:
        return [self.decoder_file, self.mam_file, *self.vision_files.values()]

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / names.MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        path = folder / names.MANIFEST_FILE
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such model folder")
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing (not an owl2-edge model folder; "
                                   f"make one with `owl2 convert`)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != names.MANIFEST_FORMAT:
            raise ModelFolderError(f"{path}: not an owl2-edge manifest")
        if raw.get("version") != names.MANIFEST_VERSION:
            raise ModelFolderError(f"{path}: manifest version {raw.get('version')!r} is not "
                                   f"supported (this owl2-edge reads version "
                                   f"{names.MANIFEST_VERSION}); convert the model again")
        try:
            manifest = cls(
                decoder_file=str(raw["decoder_file"]),
                mam_file=str(raw["mam_file"]),
                vision_files={str(k): str(v) for k, v in raw["vision_files"].items()},
                quant=str(raw["quant"]),
                pair_id=str(raw["pair_id"]),
                n_visual=int(raw["n_visual"]),
                image=ImageSpec(size=int(raw["image"]["size"]),
                                mean=tuple(float(x) for x in raw["image"]["mean"]),
                                std=tuple(float(x) for x in raw["image"]["std"]),
                                pad_color=tuple(int(x) for x in raw["image"]["pad_color"])),
                decoder=DecoderSpec(**{k: int(raw["decoder"][k])
                                       for k in DecoderSpec.__dataclass_fields__}),
                template=str(raw.get("template", names.TEMPLATE_ID)),
                source=str(raw.get("source", "")),
                extra=dict(raw.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelFolderError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        if not manifest.vision_files:
            raise ModelFolderError(f"{path}: names no vision model")
        for name in manifest.files():
            if Path(name).name != name:
                raise ModelFolderError(f"{path}: file name {name!r} must be a plain name in the folder")
            if not (folder / name).is_file():
                raise ModelFolderError(f"{folder / name}: missing (named in {names.MANIFEST_FILE})")
        return manifest
