"""Reads a Hugging Face mPLUG-Owl2 checkpoint folder, one weights file at a time.

The release is 33 PyTorch pickles plus an index (docs/architecture.md §5); safetensors and single
files are accepted too. Everything that can be checked before the slow part is checked in
Checkpoint.open (config, tokenizer, index, shard files); shapes and dtypes are checked as each
file is loaded. Every failure is a CheckpointError whose message starts with the file at fault.

Tensors come back as float32. Only the tensors the converter needs (hf_layout.expected_shapes)
are returned; buffers such as rotary_emb.inv_freq and anything unknown are ignored.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import torch

from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import Owl2Config
from owl2_edge.errors import CheckpointError

# The 16-bit release dtypes and float32; anything else (int8 quantized, float64...) is refused
# rather than silently converted.
ACCEPTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Where to look for weights, in order of preference.
WEIGHT_SOURCES = (
    hf_layout.PICKLE_INDEX,
    hf_layout.SAFETENSORS_INDEX,
    hf_layout.PICKLE_SINGLE,
    hf_layout.SAFETENSORS_SINGLE,
)


def _natural_key(name: str) -> list:
    """pytorch_model-2-of-33.bin before pytorch_model-10-of-33.bin."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _short(e: BaseException) -> str:
    """The exception's first sentence: library messages run on for paragraphs."""
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0][:160] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _starts_with(file: Path, magic: bytes) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


class Checkpoint:
    """A checked checkpoint folder. Open it with Checkpoint.open(hf_dir)."""

    def __init__(self, path: Path, config: Owl2Config, tokenizer_model: Path,
                 weight_map: dict[str, str], single_file: bool):
        self.path = path
        self.config = config
        self.tokenizer_model = tokenizer_model
        self.expected_shapes = hf_layout.expected_shapes(config)
        # Expected tensor name -> the file holding it. For a single file without an index this is
        # a promise that load_shard checks.
        self._weight_map = weight_map
        self._single_file = single_file
        self.shards: list[str] = sorted(set(weight_map.values()), key=_natural_key)

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, hf_dir: str | Path) -> "Checkpoint":
        path = Path(hf_dir)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder")
        config = Owl2Config.from_dir(path)
        expected = hf_layout.expected_shapes(config)

        tokenizer_model = path / hf_layout.TOKENIZER_MODEL
        if not tokenizer_model.is_file():
            raise CheckpointError(f"{tokenizer_model}: missing (the sentencepiece tokenizer "
                                  "is needed to convert)")

        source = next((s for s in WEIGHT_SOURCES if (path / s).is_file()), None)
        if source is None:
            raise CheckpointError(f"{path}: no weights found (expected one of "
                                  f"{', '.join(WEIGHT_SOURCES)})")
        if source.endswith(".index.json"):
            weight_map = _read_index(path / source, expected)
            single = False
        else:
            weight_map = {name: source for name in expected}
            single = True
            if source == hf_layout.SAFETENSORS_SINGLE:
                # Its header is cheap to read: report a missing tensor now rather than later.
                present = set(_safetensors_names(path / source))
                _check_all_present(path / source, expected, present)
        return cls(path, config, tokenizer_model, weight_map, single)

    # -- reading ---------------------------------------------------------------------------------

    def names_in(self, shard: str) -> list[str]:
        """The expected tensors the file holds, in release order."""
        self._check_shard(shard)
        return [n for n in self.expected_shapes if self._weight_map[n] == shard]

    def load_shard(self, shard: str) -> dict[str, torch.Tensor]:
        return self._read(shard, self.names_in(shard))

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, reading only the files that hold them, one file at a time."""
        names = list(names)
        unknown = [n for n in names if n not in self._weight_map]
        if unknown:
            raise KeyError(f"not a tensor of an mPLUG-Owl2 checkpoint: {unknown[0]}")
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self._weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(by_shard, key=_natural_key):
            tensors.update(self._read(shard, by_shard[shard]))
        return {n: tensors[n] for n in names}

    def iter_shards(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(file, tensors) for each file in turn; the previous file's tensors can be freed before
        the next is read, which keeps a 7B conversion to about one shard in memory."""
        for shard in self.shards:
            yield shard, self.load_shard(shard)

    def shard_of(self, name: str) -> str:
        return self._weight_map[name]

    # -- internals -------------------------------------------------------------------------------

    def _check_shard(self, shard: str) -> None:
        if shard not in self.shards:
            raise KeyError(f"{shard} is not a weights file of {self.path}")

    def _read(self, shard: str, names: list[str]) -> dict[str, torch.Tensor]:
        self._check_shard(shard)
        file = self.path / shard
        raw = (_read_safetensors(file, names) if shard.endswith(".safetensors")
               else _read_pickle(file))
        present = set(raw)
        if self._single_file:
            _check_all_present(file, names, present)
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in present:
                raise CheckpointError(f"{file}: tensor {name} is missing (the index says it "
                                      "is in this file)")
            tensors[name] = _checked_float32(file, name, raw.pop(name),
                                             self.expected_shapes[name])
        return tensors


def _read_index(index_file: Path, expected: dict) -> dict[str, str]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: not readable JSON ({_short(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_file}: no weight_map of tensor name -> file")
    for file in sorted(set(weight_map.values()), key=_natural_key):
        if "/" in file or "\\" in file or file in ("", ".", ".."):
            raise CheckpointError(f"{index_file}: weight_map names a file outside the "
                                  f"folder: {file!r}")
        if not (index_file.parent / file).is_file():
            raise CheckpointError(f"{index_file.parent / file}: missing (listed in "
                                  f"{index_file.name})")
    _check_all_present(index_file, expected, set(weight_map))
    return {name: weight_map[name] for name in expected}


def _check_all_present(file: Path, expected: Iterable[str], present: set[str]) -> None:
    missing = [n for n in expected if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{file}: tensor {missing[0]} is missing{more}")


def _read_pickle(file: Path) -> dict[str, torch.Tensor]:
    # mmap works only for the zip format torch.save has written since 1.6; the old format is
    # still read, just into memory.
    mmap = zipfile.is_zipfile(file)
    if not mmap and _starts_with(file, b"PK\x03\x04"):
        # A zip whose end (the central directory) is gone: an interrupted download or copy.
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint (truncated or damaged "
                              "zip archive; copy or download it again)")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged pickle can fail in many ways; all mean "unreadable"
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({_short(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(data).__name__}")
    return data


def _safetensors_names(file: Path) -> list[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_short(e)})") from None


def _read_safetensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            present = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in present}
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({_short(e)})") from None


def _checked_float32(file: Path, name: str, tensor: object,
                     shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{file}: {name} is a {type(tensor).__name__}, not a tensor")
    if tensor.dtype not in ACCEPTED_DTYPES:
        raise CheckpointError(f"{file}: tensor {name} has dtype "
                              f"{str(tensor.dtype).removeprefix('torch.')}, expected bfloat16, "
                              "float16 or float32")
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{file}: tensor {name} has shape {list(tensor.shape)}, "
                              f"expected {list(shape)}")
    try:
        return tensor.to(torch.float32)
    except RuntimeError as e:  # an mmap'd tensor whose bytes lie past a truncated file's end
        raise CheckpointError(f"{file}: tensor {name} cannot be read ({_short(e)})") from None
