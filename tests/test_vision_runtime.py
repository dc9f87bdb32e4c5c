"""VisionEncoder (ONNX Runtime over the vision ONNX) against the PyTorch reference."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import shutil

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from PIL import Image

from owl2_edge import names
from owl2_edge.convert.reference import Owl2Vision
from owl2_edge.convert.vision_onnx import export_vision_onnx
from owl2_edge.errors import ModelFolderError, Owl2Error
from owl2_edge.image import ASPECT_MODES, preprocess
from owl2_edge.model_dir import DecoderSpec, ImageSpec, Manifest
from owl2_edge.vision import CPU, VisionEncoder, cuda_possible


@pytest.fixture(scope="module")
def cfg(tiny_ckpt):
    return tiny_ckpt.config


@pytest.fixture(scope="module")
def vision(tiny_ckpt, cfg) -> Owl2Vision:
    return Owl2Vision.from_state_dict(cfg, tiny_ckpt.load(Owl2Vision.checkpoint_names(cfg)))


@pytest.fixture(scope="module")
def onnx_path(vision, tmp_path_factory):
    return export_vision_onnx(vision, tmp_path_factory.mktemp("vision") / "vision-fp32.onnx")


@pytest.fixture
def encoder(onnx_path) -> VisionEncoder:
    return VisionEncoder(onnx_path, device="cpu", n_threads=1)


def _pixels(cfg, n: int, seed: int = 0) -> list[np.ndarray]:
    """n different pictures of assorted shapes, through the runtime's own preprocessing."""
    p = cfg.preprocess
    spec = ImageSpec(size=p.image_size, mean=p.image_mean, std=p.image_std, pad_color=p.pad_color)
    rng = np.random.default_rng(seed)
    sizes = [(70, 40), (30, 90), (56, 56), (200, 120)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out.append(preprocess(picture, spec, ASPECT_MODES[i % len(ASPECT_MODES)]))
    return out


def _reference(vision, pixels) -> np.ndarray:
    with torch.no_grad():
        return vision(torch.from_numpy(np.stack(pixels))).numpy()


def _count_runs(monkeypatch, encoder) -> list:
    """Record every real ONNX Runtime run of `encoder` (independent of its own n_runs)."""
    calls = []
    real_run = encoder.session.run

    def run(*args, **kwargs):
        calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(encoder.session, "run", run)
    return calls


# ------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_encode_matches_reference_in_one_run(encoder, vision, cfg, monkeypatch, batch):
    pixels = _pixels(cfg, batch)
    calls = _count_runs(monkeypatch, encoder)
    out = encoder.encode(np.stack(pixels))
    assert out.shape == (batch, cfg.n_visual, cfg.text.hidden_size) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(vision, pixels), rtol=0, atol=1e-4)
    assert len(calls) == 1 and encoder.n_runs == 1


def test_encoder_reads_its_dimensions_from_the_graph(encoder, cfg):
    assert (encoder.image_size, encoder.n_visual, encoder.n_embd) == \
        (cfg.vision.image_size, cfg.n_visual, cfg.text.hidden_size)


def test_encode_images_matches_reference_per_image(encoder, vision, cfg):
    pixels = _pixels(cfg, 3, seed=1)
    embeds = encoder.encode_images(pixels)
    ref = _reference(vision, pixels)
    assert len(embeds) == 3
    for one, expected in zip(embeds, ref):
        assert one.shape == (cfg.n_visual, cfg.text.hidden_size)
        np.testing.assert_allclose(one, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------

def test_cache_returns_the_same_embeddings_without_running_again(encoder, cfg, monkeypatch):
    pixels = _pixels(cfg, 2, seed=2)
    calls = _count_runs(monkeypatch, encoder)
    first = encoder.encode_images(pixels)
    assert len(calls) == 1
    # Equal pixels in new arrays: the key is the content, not the object.
    again = encoder.encode_images([p.copy() for p in reversed(pixels)])
    assert len(calls) == 1 and encoder.n_runs == 1
    assert again[0] is first[1] and again[1] is first[0]
    with pytest.raises(ValueError):
        first[0][0, 0] = 0.0  # read-only: a caller cannot corrupt the cache


def test_cache_encodes_only_the_new_images_together(encoder, cfg, vision, monkeypatch):
    old, new = _pixels(cfg, 1, seed=3), _pixels(cfg, 2, seed=4)
    encoder.encode_images(old)
    calls = _count_runs(monkeypatch, encoder)
    embeds = encoder.encode_images([new[0], old[0], new[1], new[0]])
    assert len(calls) == 1 and len(calls[0][1][names.ONNX_INPUT]) == 2  # the two new ones
    assert embeds[3] is embeds[0]
    expected = _reference(vision, [new[0], old[0], new[1], new[0]])
    np.testing.assert_allclose(np.stack(embeds), expected, rtol=0, atol=1e-4)


def test_cache_forgets_the_least_recently_used(onnx_path, cfg, monkeypatch):
    encoder = VisionEncoder(onnx_path, device="cpu", cache_size=2)
    a, b, c = _pixels(cfg, 3, seed=5)
    calls = _count_runs(monkeypatch, encoder)
    encoder.encode_images([a])
    encoder.encode_images([b])
    encoder.encode_images([a])      # a is now the most recent
    encoder.encode_images([c])      # evicts b
    assert len(calls) == 3
    encoder.encode_images([a])
    assert len(calls) == 3
    encoder.encode_images([b])
    assert len(calls) == 4


def test_encode_images_runs_at_most_max_batch_images_at_once(onnx_path, cfg, monkeypatch):
    encoder = VisionEncoder(onnx_path, device="cpu", max_batch=2)
    calls = _count_runs(monkeypatch, encoder)
    encoder.encode_images(_pixels(cfg, 5, seed=6))
    assert [len(c[1][names.ONNX_INPUT]) for c in calls] == [2, 2, 1]


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------

def test_encode_refuses_pixels_of_the_wrong_shape(encoder, cfg):
    s = cfg.vision.image_size
    for shape in [(3, s, s), (1, 3, s + 14, s + 14), (1, 4, s, s), (1, s, s, 3)]:
        with pytest.raises(ValueError, match=rf"expected \[N, 3, {s}, {s}\]"):
            encoder.encode(np.zeros(shape, dtype=np.float32))


def test_encode_refuses_raw_uint8_levels(encoder, cfg):
    s = cfg.vision.image_size
    with pytest.raises(ValueError, match="float32"):
        encoder.encode(np.zeros((1, 3, s, s), dtype=np.uint8))


def test_encode_of_no_images_runs_nothing(encoder, cfg):
    out = encoder.encode(np.zeros((0, 3, cfg.vision.image_size, cfg.vision.image_size), np.float32))
    assert out.shape == (0, cfg.n_visual, cfg.text.hidden_size) and encoder.n_runs == 0


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------

def test_auto_reports_the_provider_actually_running(onnx_path):
    encoder = VisionEncoder(onnx_path)  # "auto"
    assert encoder.provider == encoder.session.get_providers()[0]
    if not cuda_possible():
        assert encoder.provider == CPU


@pytest.mark.skipif(cuda_possible(), reason="a CUDA driver is present here")
def test_asking_for_cuda_without_a_gpu_fails_instead_of_running_on_cpu(onnx_path):
    with pytest.raises(Owl2Error, match="CUDA"):
        VisionEncoder(onnx_path, device="cuda")


def test_unknown_device_is_refused(onnx_path):
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        VisionEncoder(onnx_path, device="tpu")


def test_from_folder_runs_the_fp32_file_on_cpu(onnx_path, cfg, tmp_path):
    # Both variants present: on the CPU the fp32 file must be chosen. (The "fp16" here is a copy
    # of the fp32 graph; only the choice of file is under test.)
    for name in ("decoder-q4_0.gguf", "mam-q4_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    shutil.copy(onnx_path, tmp_path / names.vision_onnx_file("fp16"))
    shutil.copy(onnx_path, tmp_path / names.vision_onnx_file("fp32"))
    data = names.vision_data_file(onnx_path.name)  # both graphs name the same data file
    shutil.copy(onnx_path.parent / data, tmp_path / data)
    p = cfg.preprocess
    Manifest(decoder_file="decoder-q4_0.gguf", mam_file="mam-q4_0.gguf",
             vision_files={v: names.vision_onnx_file(v) for v in ("fp16", "fp32")},
             quant="q4_0", pair_id="test", n_visual=cfg.n_visual,
             image=ImageSpec(size=p.image_size, mean=p.image_mean, std=p.image_std,
                             pad_color=p.pad_color),
             decoder=DecoderSpec(n_vocab=8, n_embd=1, n_layer=1, n_ctx_train=1, bos_id=1,
                                 eos_id=2)).write(tmp_path)
    encoder = VisionEncoder.from_folder(tmp_path, device="cpu")
    assert encoder.path.name == names.vision_onnx_file("fp32") and encoder.provider == CPU
    if not cuda_possible():
        assert VisionEncoder.from_folder(tmp_path).path.name == names.vision_onnx_file("fp32")


# ------------------------------------------------------------------------------------------------
# Broken files
# ------------------------------------------------------------------------------------------------

def _folder_error(path, match: str) -> ModelFolderError:
    with pytest.raises(ModelFolderError, match=match) as caught:
        VisionEncoder(path, device="cpu")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    error = caught.value
    # No chained traceback of some other exception type comes with it.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    return error


def test_corrupt_onnx_is_a_model_folder_error(tmp_path):
    path = tmp_path / "vision-fp32.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 20)
    _folder_error(path, "not a usable ONNX model")


def test_truncated_onnx_is_a_model_folder_error(onnx_path, tmp_path):
    data = onnx_path.read_bytes()
    path = tmp_path / "vision-fp32.onnx"
    path.write_bytes(data[:len(data) // 2])
    _folder_error(path, "not a usable ONNX model")


def test_missing_onnx_is_a_model_folder_error(tmp_path):
    _folder_error(tmp_path / "vision-fp32.onnx", "missing")


def test_an_onnx_with_other_inputs_is_refused(tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 28, 28])
    y = helper.make_tensor_value_info(names.ONNX_OUTPUT, TensorProto.FLOAT, ["N", 3, 28, 28])
    graph = helper.make_graph([helper.make_node("Relu", ["images"], [names.ONNX_OUTPUT])],
                              "not-vision", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              path)
    _folder_error(path, "not an owl2-edge vision model")
