"""The native module is built against llama-cpp-python's ggml and shares it with llama_cpp."""

from pathlib import Path

import gguf
import numpy as np
import pytest

from owl2_edge import _decoder


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_ggml_quantize_matches_gguf_py_reference_quantizer(type_name):
    # gguf-py carries an independent numpy implementation of these two types: bit-equal blocks
    # prove we call ggml's quantizer on the right rows with the right layout.
    x = np.random.default_rng(1).standard_normal((16, 128)).astype(np.float32)
    t = _decoder.ggml_type_from_name(type_name)
    ours = _decoder.quantize(x, t)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType(t))
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("type_name,bound", [("f16", 1e-3), ("q8_0", 2e-2), ("q6_K", 0.1), ("q4_K", 0.3)])
def test_quantize_round_trip_error_is_bounded(type_name, bound):
    x = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)
    t = _decoder.ggml_type_from_name(type_name)
    back = _decoder.dequantize(_decoder.quantize(x, t, n_threads=2), t, 256)
    err = np.abs(back - x).max()
    assert 0 < err < bound


def test_quantize_refuses_rows_that_do_not_fill_blocks():
    with pytest.raises(ValueError, match="blocks"):
        _decoder.quantize(np.zeros((2, 100), np.float32), _decoder.ggml_type_from_name("q4_0"))
    with pytest.raises(ValueError, match="unknown ggml type"):
        _decoder.ggml_type_from_name("q3_X")


def test_one_ggml_in_the_process_shared_with_llama_cpp():
    import llama_cpp  # noqa: F401  (loads its libllama and ggml)
    llama_cpp.llama_backend_init()
    maps = Path("/proc/self/maps").read_text()
    ggml_files = {line.split()[-1] for line in maps.splitlines() if "libggml-base" in line}
    assert len(ggml_files) == 1, ggml_files
    assert "/llama_cpp/lib/" in next(iter(ggml_files))
