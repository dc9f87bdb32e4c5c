"""Export the reference vision path (tower + abstractor + visual_fc + vit_eos) as one ONNX graph.

    input  names.ONNX_INPUT   float32 [N, 3, S, S]   (N dynamic)
    output names.ONNX_OUTPUT  float32 [N, n_visual, n_embd]

The abstractor's sin-cos tables are buffers of the reference, so they become graph constants.
Only the fp32 graph is exported from torch: every other variant (fp16, int8, int4) is derived
from this file by owl2_edge/vision_variants.py, the same code `owl2 quantize` runs, so a
variant is the same file whichever command made it.

Memory at the real size (~385 M parameters): the tracer runs one image; the fp32 graph (~1.5 GB)
stays under protobuf's 2 GB limit, and the checker reads the file from disk, not a second copy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from owl2_edge.convert.reference import Owl2Vision
from owl2_edge.names import ONNX_INPUT, ONNX_OUTPUT
from owl2_edge.onnx_weights import save_mappable

OPSET = 17  # first opset with LayerNormalization as one op


def export_vision_onnx(vision: Owl2Vision, path: str | Path) -> Path:
    """Write the fp32 vision ONNX of `vision` (a float32 Owl2Vision) to `path` and its weights to
    the data file beside it (owl2_edge/onnx_weights.py); returns the path."""
    path = Path(path)
    graph = vision.eval().requires_grad_(False)
    s = vision.cfg.vision.image_size
    example = torch.zeros(1, 3, s, s)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript and fails on this graph's 3-D attention; dynamo=False is deliberate.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph, (example,), str(path),
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    # The exporter's own shape pass leaves the output's row count symbolic; ONNX's inference
    # (on the file, so no second in-memory copy) proves it is n_visual, which readers then see.
    onnx.shape_inference.infer_shapes_path(str(path), str(path))
    onnx.checker.check_model(str(path))
    # Its weights then move to a data file beside it, which ONNX Runtime maps instead of copying.
    save_mappable(onnx.load(str(path)), path)
    return path
