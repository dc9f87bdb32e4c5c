"""`owl2 convert` end to end through the real command line, and its refusals."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from owl2_edge import names
from owl2_edge.convert.tiny import make_tiny_checkpoint
from owl2_edge.model_dir import Manifest


def owl2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def converted_f32(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-F32"
    r = owl2("convert", tiny_checkpoint, "-o", out, "--quant", "F32", "--vision", "fp32", "--vision", "fp16")
    assert r.returncode == 0, r.stderr
    return out


def test_convert_writes_a_complete_model_folder(converted_f32, tiny_ckpt):
    m = Manifest.load(converted_f32)
    assert m.quant == "F32"
    assert set(m.vision_files) == {"fp32", "fp16"}
    assert m.n_visual == tiny_ckpt.config.n_visual
    assert m.decoder.n_embd == tiny_ckpt.config.text.hidden_size
    assert m.image.pad_color == (122, 116, 104)
    assert sorted(p.name for p in converted_f32.iterdir()) == sorted([*m.files(), names.MANIFEST_FILE])


def test_info_reads_the_folder_and_checks_the_pair(converted_f32, tmp_path):
    r = owl2("info", converted_f32)
    assert r.returncode == 0, r.stderr
    assert "decoder" in r.stdout and "mam" in r.stdout
    # A sidecar from another conversion is refused: pair ids differ.
    other = tmp_path / "other"
    shutil.copytree(converted_f32, other)
    m = json.loads((other / names.MANIFEST_FILE).read_text())
    m["pair_id"] = "0" * 32
    (other / names.MANIFEST_FILE).write_text(json.dumps(m))
    r = owl2("info", other)
    assert r.returncode == 1
    assert "pair_id" in r.stderr and "Traceback" not in r.stderr


def test_convert_refuses_an_existing_folder_without_force(converted_f32, tiny_checkpoint):
    r = owl2("convert", tiny_checkpoint, "-o", converted_f32, "--quant", "F32")
    assert r.returncode == 1
    assert "already exists" in r.stderr


@pytest.mark.parametrize("force", [(), ("--force",)])
def test_an_output_that_is_a_file_is_one_line_and_the_file_is_kept(converted_f32, tiny_checkpoint,
                                                                    tmp_path, force):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    for args in (("convert", tiny_checkpoint, "--quant", "F32"),
                 ("quantize", converted_f32, "-q", "Q8_0")):
        r = owl2(*args, "-o", existing, *force)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == f"error: {existing}: is a file, not a model folder; give -o " \
                                   f"the name of a folder to write", r.stderr
        assert existing.read_text() == "keep me"


def _damaged_checkpoint(tmp_path: Path, damage) -> Path:
    hf = make_tiny_checkpoint(tmp_path / "hf", seed=3)
    damage(hf)
    return hf


def _drop_shard(hf: Path):
    (hf / "pytorch_model-2-of-3.bin").unlink()


def _not_owl2(hf: Path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf / "config.json").write_text(json.dumps(cfg))


def _rewrite_first_shard(hf: Path, change):
    shard = hf / "pytorch_model-1-of-3.bin"
    tensors = torch.load(shard, weights_only=True)
    change(tensors)
    torch.save(tensors, shard)


def _wrong_shape(hf: Path):
    def change(t):
        name = next(n for n in t if n.endswith("q_proj.weight"))
        t[name] = t[name][:, :-1].clone()
    _rewrite_first_shard(hf, change)


def _float64(hf: Path):
    def change(t):
        name = next(n for n in t if n.endswith("q_proj.weight"))
        t[name] = t[name].to(torch.float64)
    _rewrite_first_shard(hf, change)


def _truncated(hf: Path):
    shard = hf / "pytorch_model-1-of-3.bin"
    shard.write_bytes(shard.read_bytes()[:200])


@pytest.mark.parametrize("damage,expect", [
    (_drop_shard, "pytorch_model-2-of-3.bin"),
    (_not_owl2, "config.json"),
    (_wrong_shape, "pytorch_model-1-of-3.bin"),
    (_float64, "pytorch_model-1-of-3.bin"),
    (_truncated, "pytorch_model-1-of-3.bin"),
])
def test_bad_checkpoint_gives_one_line_naming_the_file_and_leaves_nothing(tmp_path, damage, expect):
    hf = _damaged_checkpoint(tmp_path, damage)
    out = tmp_path / "out"
    r = owl2("convert", hf, "-o", out, "--quant", "F32")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_unknown_quant_type_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    r = owl2("convert", tiny_checkpoint, "-o", tmp_path / "x", "--quant", "Q3_BOGUS")
    assert r.returncode == 1
    assert "Q3_BOGUS" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_convert_without_the_converter_packages_says_how_to_get_them(tiny_checkpoint, tmp_path):
    # A runtime-only install has no torch: simulate it by hiding torch from the child process.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "torch.py").write_text("raise ImportError('no torch here', name='torch')\n")
    import os
    env = {**os.environ, "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "convert", str(tiny_checkpoint), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1
    assert "owl2-edge[convert]" in r.stderr and "Traceback" not in r.stderr
