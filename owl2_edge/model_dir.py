"""The model folder's manifest, owl2.json: what `owl2 convert` writes and the runtime reads.

The converter fills a Manifest and calls write(); the runtime calls Manifest.load(folder), which
checks the format and version, that every file it names is there and, where the manifest records
them, each file's size and sampled digest, so a broken folder fails here with one clear line
instead of deep inside ggml or ONNX Runtime, or answering wrongly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from owl2_edge import checks, names
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError, ModelFolderError


MODEL_ENV = "OWL2_MODEL"


def cache_folder() -> Path:
    """owl2-edge's folder in the user's cache: $XDG_CACHE_HOME/owl2-edge or ~/.cache/owl2-edge."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "owl2-edge"


def demo_folder() -> Path:
    """Where `owl2 demo` keeps its generated checkpoint (hf/) and model folder (model/)."""
    return cache_folder() / "demo"


def default_model_path() -> Path:
    """-m's default: $OWL2_MODEL, then the demo model."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    return demo_folder() / "model"


class UnrecordedFolderWarning(UserWarning):
    """A model folder written before owl2-edge recorded its files' sizes and sha256: a file
    altered or swapped since cannot be caught at load (the CLI prints it as one "note:" line)."""


_noted_unrecorded: set[str] = set()


def note_unrecorded(folder: Path, manifest: "Manifest") -> None:
    """Say once per process, for a folder without file records, what that costs and how to add
    them (not per question: a server loads once and answers many)."""
    key = str(Path(folder).resolve())
    if manifest.file_records or key in _noted_unrecorded:
        return
    _noted_unrecorded.add(key)
    warnings.warn(UnrecordedFolderWarning(
        f"{display_path(folder)} has no file records (written before owl2-edge kept them), so a "
        f"file altered since cannot be caught at load; `owl2 info --record "
        f"{display_path(folder)}` adds them"), stacklevel=3)


def check_output_folder(out: Path, force: bool) -> None:
    """A model folder is written over only when it is empty or with force (`--force`); a file
    of that name never (--force replaces folders, not a file that was given by mistake)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a model folder; give -o the name of a "
                              f"folder to write")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: already exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden work folder beside `out` for `owl2 convert` and `owl2 quantize` to write into: renamed
    to `out` (replacing it) when the block ends, removed on any exception, Ctrl-C included, so a
    half-written model folder never appears under the name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


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
    # variant -> the data file its weights are in (owl2_edge/onnx_weights.py); a variant not
    # listed keeps them inside its ONNX (folders written before the data files existed).
    vision_data_files: dict[str, str] = field(default_factory=dict)
    template: str = names.TEMPLATE_ID
    source: str = ""
    format: str = names.MANIFEST_FORMAT
    version: int = names.MANIFEST_VERSION
    extra: dict = field(default_factory=dict)
    # file name -> what it must be (file_record): every file of files(), or none in folders
    # written before the records existed (nothing to check them against).
    file_records: dict[str, dict] = field(default_factory=dict)
    # How the decoder's types were chosen when not by `quant` alone (owl2_edge/recipe.py): the
    # per-tensor overrides applied on top of `quant`'s mix, and for a recipe chosen to fit a size,
    # what was measured (owl2_edge/tools/choose.py). Empty: `quant`'s mix as llama.cpp makes it.
    recipe: dict = field(default_factory=dict)

    def files(self) -> list[str]:
        return [self.decoder_file, self.mam_file, *self.vision_files.values(),
                *self.vision_data_files.values()]

    def recorded(self, folder: str | Path) -> "Manifest":
        """This manifest with the records of its files as they are now in `folder` (what convert
        and quantize write, once every file is finished)."""
        return replace(self, file_records={name: file_record(Path(folder) / name)
                                           for name in self.files()})

    def verify(self, folder: str | Path) -> dict[str, bool | None]:
        """Each file -> whether its whole content has the recorded sha256 (None: no record).
        Reads every byte (`owl2 info --verify`); a load checks only the sampled digests."""
        folder = Path(folder)
        return {name: (None if name not in self.file_records else
                       _read_digest(folder / name, full_digest)
                       == self.file_records[name]["sha256"])
                for name in self.files()}

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / names.MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Read and check a model folder's manifest: every number within what a model of this
        architecture can have, every file present and a regular file. Anything else is a
        ModelFolderError naming the manifest."""
        folder = Path(checks.path("model folder", folder))
        path = folder / names.MANIFEST_FILE
        shown, where = display_path(folder), display_path(path)
        try:
            if not folder.is_dir():
                raise ModelFolderError(f"{shown}: no such model folder")
            if not path.is_file():
                raise ModelFolderError(f"{where}: missing (not an owl2-edge model "
                                       f"folder; make one with `owl2 convert`)")
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise ModelFolderError(f"{where}: larger than a manifest can be "
                                       f"({MAX_MANIFEST_BYTES // 1024} KiB)")
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ModelFolderError(f"{shown}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise ModelFolderError(f"{where}: not UTF-8 text") from None
        try:
            raw = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise ModelFolderError(f"{where}: not readable JSON ({e})") from None
        except RecursionError:
            raise ModelFolderError(f"{where}: JSON nested too deeply") from None
        if not isinstance(raw, dict) or raw.get("format") != names.MANIFEST_FORMAT:
            raise ModelFolderError(f"{where}: not an owl2-edge manifest")
        if raw.get("version") != names.MANIFEST_VERSION:
            raise ModelFolderError(f"{where}: manifest version {raw.get('version')!r:.40} "
                                   f"is not supported (this owl2-edge reads version "
                                   f"{names.MANIFEST_VERSION}); convert the model again")
        try:
            manifest = _from_json(raw)
        except ArgumentError as e:
            raise ModelFolderError(f"{where}: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{where}: malformed manifest "
                                   f"({type(e).__name__}: {str(e)[:100]})") from None
        for name in manifest.files():
            if Path(name).name != name or name in (".", ".."):
                raise ModelFolderError(f"{where}: file name {name[:100]!r} must be a "
                                       f"plain name in the folder")
            if not (folder / name).is_file():
                raise ModelFolderError(f"{display_path(folder / name)}: missing or not a regular "
                                       f"file (named in {names.MANIFEST_FILE})")
        if manifest.file_records and set(manifest.file_records) != set(manifest.files()):
            raise ModelFolderError(f"{where}: file_records must record every file of the folder "
                                   f"and no other")
        for name, record in manifest.file_records.items():
            _check_record(folder / name, record)
        return manifest


# --- What each file must be -------------------------------------------------------------------------
# A swapped, truncated or altered file often still opens and answers, wrongly (an int8 graph
# reading another variant's data file, zeroed weights, a few flipped bytes in a graph), so the
# manifest records each file's size and sha256. A load cannot hash gigabytes every time: it
# compares the size and a "sampled" digest of SAMPLE_BLOCKS blocks at fixed, evenly spaced
# offsets (a few hundred KiB read), or of the whole file when it is at most WHOLE_FILE_BYTES
# (a graph whose weights are in a data file, the tiny models). `owl2 info --verify` compares
# the full sha256.

WHOLE_FILE_BYTES = 16 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 4096
_CHUNK = 1 << 20
MAX_FILE_BYTES = 1 << 50  # what a record's size may say


def file_record(path: Path) -> dict:
    """The manifest's record of one file: {"size", "sha256", "sampled_sha256"}."""
    return {"size": Path(path).stat().st_size, "sha256": _read_digest(path, full_digest),
            "sampled_sha256": _read_digest(path, sampled_digest)}


def full_digest(f, size: int) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def sampled_digest(f, size: int) -> str:
    """sha256 of the size and SAMPLE_BLOCKS blocks spread over the file, first and last
    included; of the whole file (as full_digest) when it is at most WHOLE_FILE_BYTES."""
    if size <= WHOLE_FILE_BYTES:
        return full_digest(f, size)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    last = size - SAMPLE_BLOCK_BYTES
    for i in range(SAMPLE_BLOCKS):
        f.seek(last * i // (SAMPLE_BLOCKS - 1))
        h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


def sampled_file_digest(path: Path) -> str:
    """A file's sampled digest (below), read now."""
    return _read_digest(path, sampled_digest)


def _read_digest(path: Path, digest) -> str:
    try:
        with open(path, "rb") as f:
            return digest(f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise ModelFolderError(f"{display_path(path)}: cannot read it "
                               f"({e.strerror or e})") from None


def _check_record(path: Path, record: dict) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelFolderError(f"{display_path(path)}: cannot read it ({e.strerror or e})") from None
    if size != record["size"] or _read_digest(path, sampled_digest) != record["sampled_sha256"]:
        raise ModelFolderError(f"{display_path(path)}: does not match the manifest: swapped, "
                               f"truncated or altered (size {size:,}, recorded "
                               f"{record['size']:,}); copy or convert the model folder again")


# What a manifest may say: the bounds of any model of this architecture (a ViT image of at most
# 4096 px, at most 4096 embeddings per image, LLaMA widths and vocabularies with room to spare).
# A manifest outside them is damaged or hostile (an image size of 1e6 would make preprocessing
# allocate until the OOM killer ends the process).
MAX_MANIFEST_BYTES = 1 << 20
LIMITS = {
    "image.size": (14, 4096),
    "n_visual": (1, 4096),
    "decoder.n_vocab": (1, 1 << 24),
    "decoder.n_embd": (1, 1 << 16),
    "decoder.n_layer": (1, 4096),
    "decoder.n_ctx_train": (1, 1 << 24),
}


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a manifest may hold")


def _from_json(raw: dict) -> Manifest:
    def integer(name, value):
        return checks.integer(name, value, *LIMITS[name])

    def string(name, value, max_len=1000):
        if not isinstance(value, str) or len(value) > max_len:
            raise ArgumentError(f"{name} must be a string of at most {max_len} characters")
        return checks.text(name, value)

    def triple(name, values, check):
        if not isinstance(values, list) or len(values) != 3:
            raise ArgumentError(f"{name} must be a list of 3 numbers (R, G, B)")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(values))

    image, decoder = raw["image"], raw["decoder"]
    vision_files = raw["vision_files"]
    if not isinstance(vision_files, dict) or not vision_files:
        raise ArgumentError("vision_files must name at least one vision model")
    for variant in vision_files:
        checks.choice("vision_files variant", variant, names.VISION_VARIANTS)
    vision_data_files = raw.get("vision_data_files", {})
    if not isinstance(vision_data_files, dict) or not set(vision_data_files) <= set(vision_files):
        raise ArgumentError("vision_data_files must map variants of vision_files to file names")
    n_vocab = integer("decoder.n_vocab", decoder["n_vocab"])
    return Manifest(
        decoder_file=string("decoder_file", raw["decoder_file"], 255),
        mam_file=string("mam_file", raw["mam_file"], 255),
        vision_files={v: string(f"vision_files.{v}", f, 255) for v, f in vision_files.items()},
        vision_data_files={v: string(f"vision_data_files.{v}", f, 255)
                           for v, f in vision_data_files.items()},
        quant=string("quant", raw["quant"], 32),
        pair_id=string("pair_id", raw["pair_id"], 128),
        n_visual=integer("n_visual", raw["n_visual"]),
        image=ImageSpec(
            size=integer("image.size", image["size"]),
            mean=triple("image.mean", image["mean"], lambda n, v: checks.number(n, v, 0, 1)),
            std=triple("image.std", image["std"],
                       lambda n, v: checks.number(n, v, 0, 10, lo_open=True)),
            pad_color=triple("image.pad_color", image["pad_color"],
                             lambda n, v: checks.integer(n, v, 0, 255))),
        decoder=DecoderSpec(
            n_vocab=n_vocab,
            n_embd=integer("decoder.n_embd", decoder["n_embd"]),
            n_layer=integer("decoder.n_layer", decoder["n_layer"]),
            n_ctx_train=integer("decoder.n_ctx_train", decoder["n_ctx_train"]),
            bos_id=checks.integer("decoder.bos_id", decoder["bos_id"], 0, n_vocab - 1),
            eos_id=checks.integer("decoder.eos_id", decoder["eos_id"], 0, n_vocab - 1)),
        template=string("template", raw.get("template", names.TEMPLATE_ID), 64),
        source=string("source", raw.get("source", ""), 4096),
        extra=_object("extra", raw.get("extra", {})),
        file_records=_records(raw.get("file_records", {})),
        recipe=_object("recipe", raw.get("recipe", {})),
    )


def vision_data_files(folder: Path, vision_files: dict[str, str]) -> dict[str, str]:
    """The data files beside a folder's vision ONNX files, for its manifest."""
    data = {v: names.vision_data_file(f) for v, f in vision_files.items()}
    return {v: f for v, f in data.items() if (Path(folder) / f).is_file()}


def _records(value) -> dict[str, dict]:
    if not isinstance(value, dict):
        raise ArgumentError(f"file_records must be an object, not {type(value).__name__}")
    records = {}
    for name, record in value.items():
        if not isinstance(record, dict) or set(record) != {"size", "sha256", "sampled_sha256"}:
            raise ArgumentError(f"file_records[{name[:100]!r}] must hold size, sha256 and "
                                f"sampled_sha256")
        records[name] = {
            "size": checks.integer(f"file_records[{name[:100]!r}].size", record["size"], 0,
                                   MAX_FILE_BYTES),
            **{key: _hex_digest(f"file_records[{name[:100]!r}].{key}", record[key])
               for key in ("sha256", "sampled_sha256")}}
    return records


def _hex_digest(name: str, value) -> str:
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise ArgumentError(f"{name} must be 64 lowercase hexadecimal digits")
    return value


def _object(name: str, value) -> dict:
    if not isinstance(value, dict):
        raise ArgumentError(f"{name} must be an object, not {type(value).__name__}")
    return dict(value)
