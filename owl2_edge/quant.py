"""Decoder quantization shared by `owl2 convert` and `owl2 quantize` (docs/design.md §2, §11):
the types, llama.cpp's quantizer for the base file, and the MAM sidecar's writer.

The base is quantized by llama.cpp's own quantizer (llama_model_quantize), so it gets exactly
llama.cpp's types and mixes (Q4_K_M raises some tensors to Q6_K...). The sidecar's attn_k/attn_v
then take, layer by layer, the type the finished base gives its own attn_k/attn_v, through the
same ggml routine (the runtime mixes both routes' K/V in one cache and one graph).

No torch here: `owl2 quantize` runs with the runtime's packages only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import gguf
import numpy as np

from owl2_edge import _decoder, gguf_names
from owl2_edge.errors import ArgumentError, CheckpointError, Owl2Error

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

MODEL_NAME = "mPLUG-Owl2"
F16_MAX = 65504.0


@dataclass(frozen=True)
class QuantType:
    name: str
    file_type: FT
    # The ggml type of the 2-D tensors when owl2-edge writes the file itself (convert from a
    # checkpoint); None when only llama.cpp's quantizer makes it (its ftype is file_type:
    # llama_ftype's values are gguf.LlamaFileType's).
    direct: T | None = None
    # llama.cpp's quantizer refuses these without an importance matrix: their mixes put some
    # tensors in iq1/iq2_xxs/iq2_xs/iq2_s/iq3_xxs, whose rounding must know which columns matter
    # (the pinned llama.cpp names the tensor and stops; owl2-edge says so before starting).
    needs_imatrix: bool = False


_QUANT_LIST = (
    QuantType("F32", FT.ALL_F32, T.F32),
    QuantType("F16", FT.MOSTLY_F16, T.F16),
    QuantType("BF16", FT.MOSTLY_BF16, T.BF16),
    QuantType("Q8_0", FT.MOSTLY_Q8_0),
    QuantType("Q6_K", FT.MOSTLY_Q6_K),
    QuantType("Q5_K_M", FT.MOSTLY_Q5_K_M),
    QuantType("Q5_K_S", FT.MOSTLY_Q5_K_S),
    QuantType("Q5_1", FT.MOSTLY_Q5_1),
    QuantType("Q5_0", FT.MOSTLY_Q5_0),
    QuantType("Q4_K_M", FT.MOSTLY_Q4_K_M),
    QuantType("Q4_K_S", FT.MOSTLY_Q4_K_S),
    QuantType("Q4_1", FT.MOSTLY_Q4_1),
    QuantType("Q4_0", FT.MOSTLY_Q4_0),
    QuantType("IQ4_NL", FT.MOSTLY_IQ4_NL),
    QuantType("IQ4_XS", FT.MOSTLY_IQ4_XS),
    QuantType("Q3_K_L", FT.MOSTLY_Q3_K_L),
    QuantType("Q3_K_M", FT.MOSTLY_Q3_K_M),
    QuantType("Q3_K_S", FT.MOSTLY_Q3_K_S),
    QuantType("IQ3_M", FT.MOSTLY_IQ3_M),
    QuantType("IQ3_S", FT.MOSTLY_IQ3_S),
    QuantType("IQ3_XS", FT.MOSTLY_IQ3_XS, needs_imatrix=True),
    QuantType("IQ3_XXS", FT.MOSTLY_IQ3_XXS, needs_imatrix=True),
    QuantType("Q2_K", FT.MOSTLY_Q2_K),
    QuantType("Q2_K_S", FT.MOSTLY_Q2_K_S, needs_imatrix=True),
    QuantType("IQ2_M", FT.MOSTLY_IQ2_M, needs_imatrix=True),
    QuantType("IQ2_S", FT.MOSTLY_IQ2_S, needs_imatrix=True),
    QuantType("IQ2_XS", FT.MOSTLY_IQ2_XS, needs_imatrix=True),
    QuantType("IQ2_XXS", FT.MOSTLY_IQ2_XXS, needs_imatrix=True),
    QuantType("IQ1_M", FT.MOSTLY_IQ1_M, needs_imatrix=True),
    QuantType("IQ1_S", FT.MOSTLY_IQ1_S, needs_imatrix=True),
)
# Every type llama.cpp's quantizer offers for a LLaMA model, from the largest to the smallest.
# Left out: the ternary TQ1_0/TQ2_0 (only for models trained ternary) and the MoE-only MXFP4.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in _QUANT_LIST}
# The source types `owl2 quantize` takes without --allow-requantize.
FLOAT_TYPES = ("F32", "F16", "BF16")


def check_quant(name: str) -> str:
    """The canonical spelling of a quantization name (case-insensitive), or ValueError."""
    canonical = str(name).strip().upper()
    if canonical not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {name!r}; choose one of "
                         f"{', '.join(QUANT_TYPES)}")
    return canonical


def check_imatrix_need(quant: str, importance) -> None:
    """Refuse a type that needs an importance matrix when none is given."""
    if importance is None and QUANT_TYPES[check_quant(quant)].needs_imatrix:
        raise ArgumentError(f"{quant} needs an importance matrix: make one with `owl2 imatrix` "
                            f"and pass it with --imatrix")


# --- llama.cpp's quantizer ------------------------------------------------------------------------

def llama_quantize(src: Path, dst: Path, qt: QuantType, importance: dict[str, np.ndarray] | None = None,
                   allow_requantize: bool = False, dry_run: bool = False) -> str:
    """llama.cpp's llama_model_quantize with the llama-quantize tool's defaults; returns what it
    logged. importance: GGUF tensor name -> float32 weights per column (an importance matrix's
    means, as that tool passes them). dry_run: decide every tensor's type, write nothing."""
    import llama_cpp

    from owl2_edge.llama_log import captured_llama_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(qt.file_type)
    params.nthread = _decoder.default_n_threads()
    params.allow_requantize = bool(allow_requantize)
    params.dry_run = bool(dry_run)
    keep = []  # what the C array points into lives until the call returns
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, weights) in enumerate(importance.items()):
            data = np.ascontiguousarray(weights, dtype=np.float32)
            keep += [name.encode(), data]
            entries[i].name = keep[-2]
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        # The last entry stays zeroed: llama.cpp reads up to a null name.
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
        keep.append(entries)
    with captured_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst),
                                            ctypes.byref(params))
    if rc != 0:
        raise Owl2Error(f"llama.cpp could not quantize the decoder to {qt.name}: "
                        f"{log.first_error() or f'llama_model_quantize returned {rc}'}")
    return "".join(text for _, text in log.lines)


# A dry run logs one line per tensor, "[  3/291] blk.0.attn_k.weight - [...], type = f16," and
# then "size = 32.00 MiB -> 9.00 MiB (q4_K)" (or "size = ... MiB" alone when it keeps the type).
_DRY_RUN_TENSOR = re.compile(r"\]\s+(\S+)\s+- \[")
_DRY_RUN_TARGET = re.compile(r"->\s+[\d.]+ MiB \((\w+)\)")
DRY_RUN_QUANT_SIZE = re.compile(r"quant size\s+=\s+([\d.]+) MiB")


def planned_types(src: Path, qt: QuantType, importance: dict[str, np.ndarray] | None = None
                  ) -> dict[str, int]:
    """GGUF tensor name -> the ggml type llama.cpp's quantizer would give it at `qt` (its dry
    run: no tensor data is read). Tensors it keeps as they are are left out."""
    return planned_types_in(llama_quantize(src, src.with_name(src.name + ".dry-run"), qt,
                                           importance, dry_run=True))


def planned_types_in(log: str) -> dict[str, int]:
    """The tensor types a dry run's log gives (planned_types)."""
    types, current = {}, None
    for line in log.splitlines():
        if m := _DRY_RUN_TENSOR.search(line):
            current = m.group(1)
        if current and (m := _DRY_RUN_TARGET.search(line)):
            types[current] = _decoder.ggml_type_from_name(m.group(1))
    return types


def read_tensor_types(path: str | Path) -> dict[str, int]:
    """GGUF tensor name -> ggml type id, as the file says."""
    reader = gguf.GGUFReader(path)
    return {t.name: int(t.tensor_type) for t in reader.tensors}


# --- Encoding tensors -----------------------------------------------------------------------------

def byte_shape(shape: tuple[int, ...], ggml_type: int) -> tuple[int, ...]:
    return (*shape[:-1], _decoder.row_bytes(ggml_type, shape[-1]))


def declare(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], ggml_type: int) -> None:
    """A tensor info of `shape` (PyTorch's order: rows, cols) stored as `ggml_type`."""
    shape_in_bytes = byte_shape(shape, ggml_type)
    writer.add_tensor_info(name, shape_in_bytes, np.dtype(np.uint8), int(np.prod(shape_in_bytes)),
                           raw_dtype=T(ggml_type))


def encode(values: np.ndarray, name: str, ggml_type: int,
           importance: np.ndarray | None = None) -> np.ndarray:
    """float32 values in GGUF's row order -> the bytes GGUF stores ([rows, row_bytes] uint8)."""
    rows = np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1, values.shape[-1]))
    if ggml_type == T.F32:
        return rows.view(np.uint8)
    if ggml_type == T.F16:
        peak = float(np.abs(rows).max(initial=0.0))
        if not peak <= F16_MAX:  # also catches NaN
            raise CheckpointError(f"{name}: values up to {peak:g} do not fit float16")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
    return _decoder.quantize(rows, int(ggml_type), importance=importance)


def decode(tensor) -> np.ndarray:
    """A gguf.ReaderTensor's values as float32 in PyTorch's (rows, cols) order."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    raw = np.ascontiguousarray(tensor.data)
    if tensor.tensor_type == T.F32:
        return raw.reshape(shape).astype(np.float32, copy=False)
    rows = raw.view(np.uint8).reshape(int(np.prod(shape[:-1], dtype=np.int64)), -1)
    return _decoder.dequantize(rows, int(tensor.tensor_type), shape[-1]).reshape(shape)


# --- The sidecar ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SidecarHeader:
    n_layer: int
    n_embd: int
    kv_width: int
    pair_id: str


def write_sidecar(path: Path, header: SidecarHeader, tensors: list[tuple[str, tuple[int, ...]]],
                  layers: Iterable[list[np.ndarray]], base_types: dict[str, int],
                  importance: dict[str, np.ndarray] | None = None,
                  tick: Callable[[], None] | None = None) -> None:
    """The MAM sidecar. tensors: (GGUF name, shape) of every tensor in file order, the routed
    parts layer by layer; layers: per decoder layer, the float32 values of that layer's tensors
    in the same order and in GGUF's row order (the caller reads one layer at a time: a 7B
    layer's visual K/V are 128 MB of float32). importance: the sidecar's entries of an importance
    matrix, by GGUF name."""

    def ggml_type(name: str, shape: tuple[int, ...]) -> int:
        # K/V mirror the base's type of the same layer; norms are float32 like the base's.
        if len(shape) == 1:
            return T.F32
        if name not in base_types:
            raise Owl2Error(f"the base GGUF has no {name}")
        return base_types[name]

    with contextlib.closing(gguf.GGUFWriter(path, gguf_names.ARCHITECTURE)) as writer:
        writer.add_name(f"{MODEL_NAME} modality-adaptive module")
        writer.add_string(gguf_names.KEY_GENERAL_TYPE, gguf_names.ADAPTER_GENERAL_TYPE)
        writer.add_string(gguf_names.KEY_ADAPTER_TYPE, gguf_names.MAM_ADAPTER_TYPE)
        writer.add_string(gguf_names.KEY_PAIR_ID, header.pair_id)
        writer.add_uint32(gguf_names.KEY_MAM_BLOCK_COUNT, header.n_layer)
        writer.add_uint32(gguf_names.KEY_MAM_EMBEDDING_LENGTH, header.n_embd)
        writer.add_uint32(gguf_names.KEY_MAM_KV_WIDTH, header.kv_width)
        for name, shape in tensors:
            declare(writer, name, shape, ggml_type(name, shape))
        write_preamble(writer)
        order = iter(tensors)
        for layer in layers:
            for values in layer:
                name, shape = next(order)
                if tuple(values.shape) != tuple(shape):
                    raise Owl2Error(f"{name}: shape {list(values.shape)}, expected {list(shape)}")
                weights = importance.get(name) if importance else None
                writer.write_tensor_data(encode(values, name, ggml_type(name, shape), weights))
            if tick is not None:
                tick()
        if next(order, None) is not None:
            raise Owl2Error("the sidecar's layers ended before its tensors")


def write_preamble(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


# --- Files ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path`; rename it to `path` only if the block succeeds."""
    part = path.with_name(f".{path.name}.part")
    with removed_after(part):
        yield part
        os.replace(part, path)


@contextlib.contextmanager
def removed_after(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
