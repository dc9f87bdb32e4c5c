"""Vision ONNX variants made from the fp32 vision ONNX with ONNX tooling alone (onnx, onnx-ir and
onnxruntime's own quantizers; no torch), so `owl2 convert --vision` and `owl2 quantize` write the
same files.

    derive_variant(folder / "vision-fp32.onnx", "int4", folder / "vision-int4.onnx")

    fp32  the file itself, copied
    fp16  fp16 weights and math, softmax in float32, casts inside the graph
          (onnxruntime.transformers.float16)
    int8  dynamic quantization: the MatMul weights int8 per output channel, each activation
          quantized to uint8 as it arrives (onnxruntime.quantization.quantize_dynamic)
    int4  weight-only 4 bits: MatMul -> MatMulNBits, symmetric blocks of 32 along K, computed
          in float32 (onnxruntime.quantization.matmul_nbits_quantizer)

Every variant keeps the interface: names.ONNX_INPUT float32 [N, 3, S, S] -> names.ONNX_OUTPUT
float32 [N, n_visual, n_embd]. The finished file must pass onnx.checker and open the way the
runtime opens it (VisionEncoder, on the CPU) before it is renamed into place, so a file that
ONNX Runtime cannot load is never written. Why each setting, with the measurements: docs/design.md §2.3 and
benchmarks/bench_vision.py.

At the release's size (fp32 file 1.5 GB, under protobuf's 2 GB limit, so every file is one
protobuf with its weights inside) the peaks measured were: int8 4.6 GB, fp16 3.7 GB, int4
3.0 GB. The tools write their temporaries beside the file they read; they read a link in a
private folder beside the output, so nothing is ever written into the source's folder (it may be
read-only, or another model's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

from owl2_edge import checks, names
from owl2_edge.errors import ArgumentError, ModelFolderError
from owl2_edge.onnx_weights import save_mappable

# int4: blocks of 32 weights along K, symmetric (no zero points). Blocks of 128 made a file 13 %
# smaller but lost accuracy (7B-shaped, random weights: cosine 0.886 against 0.904; trained demo
# model: 0.9964 against 0.9981) for no speed.
INT4_BLOCK = 32
# MatMulNBits' accuracy_level: 0 (unset) computes in the input's type, float32. Level 4 (int8
# activations) was no faster on the 2-core AVX2 machine (5.9 s against 5.8 s an image, fp32
# 5.6 s), loaded slower (1.9 s against 1.4 s: it repacks every weight) and was less exact.
INT4_ACCURACY_LEVEL = 0


def check_variants(variants) -> tuple[str, ...]:
    """The vision variants asked for (convert's and quantize's --vision), each once, in the order
    asked; an ArgumentError (a ValueError) for none or an unknown one."""
    variants = tuple(dict.fromkeys(variants))
    if not variants:
        raise ArgumentError("no vision variant asked for")
    for v in variants:
        if v not in names.VISION_VARIANTS:
            raise ArgumentError(f"unknown vision variant {v!r}; choose from "
                                f"{', '.join(names.VISION_VARIANTS)}")
    return variants


def derive_variant(fp32_path: str | Path, variant: str, out_path: str | Path) -> Path:
    """Write the vision ONNX `variant` of the fp32 vision ONNX at `fp32_path` to `out_path`
    (atomically: a crash leaves no file there); returns out_path.

    A variant outside names.VISION_VARIANTS is an ArgumentError (a ValueError); a missing
    source or a result ONNX Runtime cannot open is a ModelFolderError."""
    variant = checks.choice("vision variant", variant, names.VISION_VARIANTS)
    fp32_path = Path(checks.path("fp32_path", fp32_path))
    out_path = Path(checks.path("out_path", out_path))
    if not fp32_path.is_file():
        raise ModelFolderError(f"{checks.display_path(fp32_path)}: missing fp32 vision model")
    work = out_path.parent / f".{out_path.name}.work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("source", "made", "final"):
        (work / sub).mkdir(parents=True)
    try:
        made = work / "made" / out_path.name
        with _quiet_tools():
            _MAKERS[variant](_source_in(work / "source", fp32_path), made)
        # Written again with its weights in a data file that ONNX Runtime maps (onnx_weights.py).
        final = work / "final" / out_path.name
        final_data = save_mappable(_load_onnx(made), final)
        _check_loads(final)
        os.replace(final_data, out_path.parent / final_data.name)
        os.replace(final, out_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_path


# --- The variants ---------------------------------------------------------------------------------

def _copy(source: Path, out: Path) -> None:
    import onnx
    onnx.save(_load_onnx(source), str(out))


def _load_onnx(path: Path):
    import onnx
    return onnx.load(str(path))  # with its weights, wherever they are kept


def _fp16(source: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # keep_io_types: float32 in and out, as the runtime feeds and reads every variant. Softmax
    # stays float32 (between casts), as the reference computes it: the scores over 1089 keys
    # are summed there. LayerNormalization is left fp16: keeping it float32 makes this converter
    # give two Cast nodes one name where a tensor feeds several of them (an invalid graph), and
    # the op keeps its mean and variance in float32 anyway (its stash_type).
    model = convert_float_to_float16(str(source), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"])
    # The converter appends the input's Cast after the nodes that read it: ONNX Runtime sorts
    # a graph itself, but the ONNX standard (and onnx.checker) wants nodes in order.
    OnnxModel(model).topological_sort(is_deterministic=True)
    onnx.save(model, str(out))


def _int8(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Weights int8 per output channel with reduce_range (7 bits): on x86 without VNNI, ONNX
    # Runtime multiplies uint8 activations by int8 weights with pairwise int16 sums that
    # saturate when full-range weights meet large activations; per channel without it lost 13x
    # more (trained demo model: cosine 0.9988 against 0.99991). Only weight x activation
    # products: attention's activation x activation MatMuls stay float32.
    quantize_dynamic(source, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     reduce_range=True, weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True})


def _int4(source: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=INT4_BLOCK,
                                     is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


_MAKERS: dict[str, Callable[[Path, Path], None]] = {
    "fp32": _copy, "fp16": _fp16, "int8": _int8, "int4": _int4}
assert set(_MAKERS) == set(names.VISION_VARIANTS), "a vision variant without a maker"


# --- Around them ----------------------------------------------------------------------------------

def _source_in(work: Path, fp32_path: Path) -> Path:
    """The source, seen from `work`: the tools write their temporaries (a shape-inferred copy,
    1.5 GB at the release's size) beside the file they are given. A source with a data file is
    written there whole, as one file: onnx refuses to read a data file through a link."""
    copy = work / "source-fp32.onnx"
    if (fp32_path.parent / names.vision_data_file(fp32_path.name)).is_file():
        _copy(fp32_path, copy)
        return copy
    try:
        copy.symlink_to(fp32_path.resolve())
    except OSError:  # no symlinks (Windows without the privilege): a copy does it too
        shutil.copyfile(fp32_path, copy)
    return copy


def _check_loads(path: Path) -> None:
    """A valid ONNX file (onnx.checker, on the file: no second copy in memory) that opens as the
    runtime opens it (VisionEncoder refuses any other interface)."""
    import onnx

    from owl2_edge.vision import VisionEncoder

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ModelFolderError(f"{checks.display_path(path)}: not a valid ONNX model "
                               f"({' '.join(str(e).split())[:300]})") from None
    VisionEncoder(path, device="cpu", n_threads=1, cache_size=0)


@contextlib.contextmanager
def _quiet_tools():
    """The quantizers log through `logging`: a warning to run their pre-processing, a line per
    MatMul, and matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported,
    which would print every library's INFO lines on stderr from then on. Their errors raise;
    their log is not for a user, so it is held back here and the root logger put back."""
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(max(logging.WARNING, disabled))
    try:
        yield
    finally:
        logging.disable(disabled)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
