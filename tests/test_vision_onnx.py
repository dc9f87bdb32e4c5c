"""The vision ONNX (tower + abstractor + visual_fc + vit_eos in one graph) against the reference."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import Owl2Config
from owl2_edge.convert.reference import Owl2Vision
from owl2_edge.convert.reference_io import preprocess
from owl2_edge.convert.tiny import random_tensor
from owl2_edge.convert.vision_onnx import export_vision_onnx
from owl2_edge.names import ONNX_INPUT, ONNX_OUTPUT
from owl2_edge.vision_variants import derive_variant

CPU = ["CPUExecutionProvider"]  # onnxruntime-gpu falls back silently; say which one we mean


@pytest.fixture(scope="module")
def vision(tiny_ckpt) -> Owl2Vision:
    return Owl2Vision.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def onnx_fp32(vision, tmp_path_factory):
    return export_vision_onnx(vision, tmp_path_factory.mktemp("onnx") / "vision-fp32.onnx")


@pytest.fixture(scope="module")
def onnx_fp16(onnx_fp32, tmp_path_factory):
    # Derived from the fp32 file, as `owl2 convert --vision fp16` makes it.
    return derive_variant(onnx_fp32, "fp16", tmp_path_factory.mktemp("onnx") / "vision-fp16.onnx")


def _images(cfg, n: int) -> np.ndarray:
    """n preprocessed photos-like images of assorted sizes and aspect ratios, all three modes."""
    rng = np.random.default_rng(n)
    sizes = [(40, 30), (56, 56), (100, 37), (23, 61), (90, 90)]
    modes = ["pad", "resize", "crop"]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(preprocess(img, cfg.preprocess, modes[i % len(modes)]))
    return np.stack(out)


def _run(path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=CPU)
    assert session.get_providers() == CPU
    return session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0]


def _reference(vision, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return vision(torch.from_numpy(pixels)).numpy()


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_onnx_matches_reference(vision, onnx_fp32, tiny_ckpt, batch):
    pixels = _images(tiny_ckpt.config, batch)
    out, ref = _run(onnx_fp32, pixels), _reference(vision, pixels)
    assert out.shape == (batch, tiny_ckpt.config.n_visual, tiny_ckpt.config.text.hidden_size)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_onnx_interface_is_float32_with_a_dynamic_batch(onnx_fp32, onnx_fp16, tiny_ckpt):
    cfg = tiny_ckpt.config
    for path in (onnx_fp32, onnx_fp16):
        graph = onnx.load(str(path)).graph
        # One input only: the sin-cos tables (and every weight) are constants of the graph.
        assert [i.name for i in graph.input] == [ONNX_INPUT]
        assert [o.name for o in graph.output] == [ONNX_OUTPUT]
        (inp,), (outp,) = graph.input, graph.output
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
        assert isinstance(in_dims[0], str) and isinstance(out_dims[0], str)  # symbolic batch
        assert in_dims[1:] == [3, cfg.vision.image_size, cfg.vision.image_size]
        assert out_dims[1:] == [cfg.n_visual, cfg.text.hidden_size]


def test_fp16_onnx_has_fp16_weights_and_stays_close(vision, onnx_fp16, tiny_ckpt):
    model = onnx.load(str(onnx_fp16))
    onnx.checker.check_model(model)
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 256]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    pixels = _images(tiny_ckpt.config, 3)
    out, ref = _run(onnx_fp16, pixels), _reference(vision, pixels)
    assert out.dtype == np.float32
    # fp16 math through 2 + 2 tiny layers: seen about 1e-2 of an output scale of ~4.
    assert np.abs(out - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.slow
def test_real_size_export_runs_in_onnxruntime(tmp_path):
    """The 7B release's vision dims (ViT-L/14 @448, 24 layers + 6 abstractor layers), random
    weights: the export fits in memory, passes the checker and matches the reference."""
    cfg = Owl2Config()
    names = Owl2Vision.checkpoint_names(cfg)
    shapes = hf_layout.expected_shapes(cfg)
    vision = Owl2Vision.from_state_dict(cfg, {n: random_tensor(n, shapes[n], 0) for n in names})
    t0 = time.perf_counter()
    path = export_vision_onnx(vision, tmp_path / "vision-fp32.onnx")
    export_s = time.perf_counter() - t0
    s = cfg.vision.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=CPU)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0]
    run_s = time.perf_counter() - t0
    ref = _reference(vision, pixels)
    size_mib = path.stat().st_size / 2**20
    print(f"\nreal-size vision ONNX: {size_mib:.0f} MiB, export {export_s:.0f} s, "
          f"session load {load_s:.1f} s, one image {run_s:.1f} s, "
          f"max |onnx - ref| {np.abs(out - ref).max():.2e} (ref max {np.abs(ref).max():.2f})")
    assert out.shape == (1, cfg.n_visual, cfg.text.hidden_size)
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max()
