"""`owl2 quantize` on damaged model folders (issue 24): it refuses, in one line and before gguf-py
or llama.cpp's quantizer reads a file, every folder that `owl2 ask` (Owl2.load) refuses, with
the same message; it never writes a folder that Owl2.load refuses. Every source here has lost
its manifest's file records (a folder written before them), so the refusals come from the
checks of the files themselves, not from the digests (tests/test_folder_integrity.py).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import gguf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_hostile_gguf import VT, drop_key, rewrite, set_key  # noqa: E402

from owl2_edge import gguf_names, names, quant  # noqa: E402
from owl2_edge.errors import ModelFolderError, Owl2Error  # noqa: E402
from owl2_edge.owl2 import Owl2  # noqa: E402
from owl2_edge.tools import quantize  # noqa: E402
from owl2_edge.tools.quantize import quantize_folder  # noqa: E402


def unrecorded_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / names.MANIFEST_FILE).read_text())
    del manifest["file_records"]
    (dst / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    return dst


class Twin(str):
    """A key equal in bytes to another but a distinct dict key: rewrite() then writes the same
    key twice (a duplicated GGUF key)."""
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


def duplicate_key(key: str, vtype, value):
    def edit(kv, tensors):
        kv[Twin(key)] = (vtype, value, None)
    return edit


def tensor_dim(i: int, d: int, n: int):
    def edit(kv, tensors):
        tensors[i][1][d] = n
    return edit


def tensor_type(i: int, ggml_type: int):
    def edit(kv, tensors):
        tensors[i][2] = int(ggml_type)
    return edit


def drop_tensor(i: int):
    def edit(kv, tensors):
        del tensors[i]
    return edit


def truncate(n: int):
    def damage(path: Path):
        path.write_bytes(path.read_bytes()[:-n])
    return damage


# (which GGUF, the edit) -> damaged files of the kinds the fuzzer found.
GGUF_CASES = {
    "mam-duplicate-block-count": ("mam", duplicate_key(gguf_names.KEY_MAM_BLOCK_COUNT, VT.UINT32, 2)),
    "mam-duplicate-pair-id": ("mam", duplicate_key(gguf_names.KEY_PAIR_ID, VT.STRING, b"other")),
    "mam-block-count-0": ("mam", set_key(gguf_names.KEY_MAM_BLOCK_COUNT, VT.UINT32, 0)),
    "mam-block-count-string": ("mam", set_key(gguf_names.KEY_MAM_BLOCK_COUNT, VT.STRING, b"2")),
    "mam-no-kv-width": ("mam", drop_key(gguf_names.KEY_MAM_KV_WIDTH)),
    "mam-pair-id-not-utf8": ("mam", set_key(gguf_names.KEY_PAIR_ID, VT.STRING, b"\xff\xfe")),
    "mam-pair-id-a-number": ("mam", set_key(gguf_names.KEY_PAIR_ID, VT.UINT32, 7)),
    "mam-zero-dim": ("mam", tensor_dim(0, 0, 0)),
    "mam-zero-second-dim": ("mam", tensor_dim(1, 1, 0)),
    "mam-f16-type-on-f32-data": ("mam", tensor_type(1, gguf.GGMLQuantizationType.F16)),
    "mam-q8-type-on-f32-data": ("mam", tensor_type(1, gguf.GGMLQuantizationType.Q8_0)),
    "mam-tensor-missing": ("mam", drop_tensor(3)),
    "base-block-count-0": ("decoder", set_key(gguf_names.KEY_BLOCK_COUNT, VT.UINT32, 0)),
    "base-duplicate-block-count": ("decoder", duplicate_key(gguf_names.KEY_BLOCK_COUNT,
                                                            VT.UINT32, 2)),
    "base-zero-dim": ("decoder", tensor_dim(0, 0, 0)),
}
BYTE_CASES = {
    "mam-truncated": ("mam", truncate(100)),
    "mam-header-only": ("mam", lambda p: p.write_bytes(p.read_bytes()[:24])),
    "base-truncated": ("decoder", truncate(4096)),
    "vision-truncated": ("vision", truncate(1000)),
    "vision-garbage": ("vision", lambda p: p.write_bytes(b"\x08\x07" + bytes(200))),
}


@pytest.fixture
def damaged(tiny_model_dir, tmp_path):
    """damaged(case) -> a copy of the tiny folder, without file records, with one file damaged."""
    def make(case: str) -> Path:
        folder = unrecorded_copy(tiny_model_dir, tmp_path / case)
        manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
        files = {"mam": manifest["mam_file"], "decoder": manifest["decoder_file"],
                 "vision": manifest["vision_files"]["fp32"]}
        if case in GGUF_CASES:
            which, edit = GGUF_CASES[case]
            path = folder / files[which]
            rewrite(path, tmp_path / "edited.gguf", edit).replace(path)
        else:
            which, damage = BYTE_CASES[case]
            damage(folder / files[which])
        return folder
    return make


@pytest.fixture
def spy_readers(monkeypatch):
    """spy_readers(): from then on gguf-py's reader and llama.cpp's quantizer fail the test if
    they are reached."""
    def reached(name):
        def spy(*args, **kwargs):
            raise AssertionError(f"{name} read a folder that should have been refused first")
        return spy

    def start():
        monkeypatch.setattr(gguf, "GGUFReader", reached("gguf-py"))
        monkeypatch.setattr(quant, "llama_quantize", reached("llama.cpp's quantizer"))
    return start


def load_refusal(folder: Path) -> str:
    with pytest.raises(Owl2Error) as e:
        Owl2.load(folder, device="cpu", n_ctx=64)
    return str(e.value)


@pytest.mark.parametrize("case", [*GGUF_CASES, *BYTE_CASES])
def test_quantize_refuses_what_load_refuses_before_reading_a_file(case, damaged, spy_readers,
                                                                  tmp_path):
    folder = damaged(case)
    said = load_refusal(folder)
    spy_readers()
    with pytest.raises(Owl2Error) as e:
        quantize_folder(folder, tmp_path / "out", "Q8_0")
    assert str(e.value) == said and "\n" not in said
    assert not (tmp_path / "out").exists()


def _owl2(*args, timeout=120):
    code = "import sys; from owl2_edge.cli import main; sys.argv[0] = 'owl2'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["mam-duplicate-block-count", "mam-zero-dim", "mam-block-count-0",
                                  "base-block-count-0", "mam-truncated", "mam-f16-type-on-f32-data"])
def test_the_quantize_command_refuses_in_one_line(case, damaged, tmp_path):
    folder = damaged(case)
    r = _owl2("quantize", folder, "-o", tmp_path / "out", "-q", "Q8_0")
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_a_vision_variant_that_load_does_not_open_is_checked_too(tiny_model_dir, tmp_path,
                                                                 spy_readers):
    """Owl2.load opens one variant (the CPU's preferred); quantize copies every one, so every
    one is opened first."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    from owl2_edge.vision_variants import derive_variant
    derive_variant(src / "vision-fp32.onnx", "fp16", src / "vision-fp16.onnx")
    manifest = json.loads((src / names.MANIFEST_FILE).read_text())
    del manifest["file_records"]
    manifest["vision_files"]["fp16"] = "vision-fp16.onnx"
    manifest["vision_data_files"]["fp16"] = "vision-fp16.onnx.data"
    (src / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    with Owl2.load(src, device="cpu", n_ctx=64):  # the fp32 file: loads
        pass
    data = src / "vision-fp16.onnx.data"
    data.write_bytes(data.read_bytes()[:-64])  # the fp16 weights cut short
    spy_readers()
    with pytest.raises(ModelFolderError, match=r"vision-fp16\.onnx"):
        quantize_folder(src, tmp_path / "out", "Q8_0")
    assert not (tmp_path / "out").exists()


def test_quantize_never_writes_a_folder_that_load_refuses(tiny_model_dir, tmp_path, monkeypatch):
    """Whatever goes wrong in writing (here: a vision graph damaged as it is copied), the staged
    folder is loaded before it is renamed into place."""
    write_vision = quantize._write_vision

    def damaging(src, manifest, work, variants, report):
        files = write_vision(src, manifest, work, variants, report)
        graph = work / files["fp32"]
        graph.write_bytes(graph.read_bytes()[:-500])
        return files
    monkeypatch.setattr(quantize, "_write_vision", damaging)
    out = tmp_path / "out"
    with pytest.raises(ModelFolderError, match=r"the quantized folder does not load, so .*out was "
                                               r"not written: .*vision-fp32\.onnx"):
        quantize_folder(tiny_model_dir, out, "Q8_0")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_quantized_folder_records_its_files_and_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "q8"
    manifest = quantize_folder(tiny_model_dir, out, "Q8_0", vision=["fp32", "int8"])
    assert set(manifest.file_records) == set(manifest.files())
    assert all(manifest.verify(out).values())
    assert Owl2.check_folder(out) == manifest
