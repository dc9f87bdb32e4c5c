"""Export the reference vision path (tower + abstractor + visual_fc + vit_eos) as one ONNX graph.

    input  names.ONNX_INPUT   float32 [N, 3, S, S]   (N dynamic)
    output names.ONNX_OUTPUT  float32 [N, n_visual, n_embd]

The abstractor's sin-cos tables are buffers of the reference, so they become graph constants.
Variants: "fp32", and "fp16" = fp16 weights and math behind float32 I/O (the casts are inside
the graph, so the runtime feeds and reads float32 whatever the variant). The reference computes
softmax in float32 in either variant (scores over 1089 keys overflow fp16 range less, and ONNX
Runtime's CPU provider has float32 Softmax everywhere).

Memory at the real size (~385 M parameters): the tracer runs one image; the fp32 graph (~1.5 GB)
stays under protobuf's 2 GB limit, and the checker reads the file from disk, not a second copy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from owl2_edge.convert.reference import Owl2Vision, _build
from owl2_edge.names import ONNX_INPUT, ONNX_OUTPUT, VISION_VARIANTS

OPSET = 17  # first opset with LayerNormalization as one op


class _Float32IO(nn.Module):
    """Runs `vision` in its own dtype behind float32 input and output."""

    def __init__(self, vision: Owl2Vision, dtype: torch.dtype):
        super().__init__()
        self.vision, self.dtype = vision, dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.vision(pixels)
        return self.vision(pixels.to(self.dtype)).to(torch.float32)


def _converted_copy(vision: Owl2Vision, dtype: torch.dtype) -> Owl2Vision:
    """A copy of `vision` in `dtype`, built directly in it (no second float32 copy)."""
    copy = _build(lambda: Owl2Vision(vision.cfg))
    copy.load_state_dict({k: v.to(dtype) for k, v in vision.state_dict().items()},
                         strict=True, assign=True)
    # The sin-cos tables are non-persistent buffers, outside state_dict: carry them over as-is.
    for name, buffer in vision.named_buffers():
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner).register_buffer(leaf, buffer.to(dtype), persistent=False)
    return copy.eval()


def export_vision_onnx(vision: Owl2Vision, path: str | Path, variant: str = "fp32") -> Path:
    """Write the vision ONNX of `vision` (a float32 Owl2Vision) to `path`; returns the path."""
    if variant not in VISION_VARIANTS:
        raise ValueError(f"unknown vision variant {variant!r}; expected one of {VISION_VARIANTS}")
    path = Path(path)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    graph = _Float32IO(vision if dtype == torch.float32 else _converted_copy(vision, dtype), dtype)
    graph.eval().requires_grad_(False)
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
    return path
