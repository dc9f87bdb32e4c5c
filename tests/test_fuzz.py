"""A bounded run of the file fuzzer (tests/fuzz_model_files.py) on the tiny model: every mutated
GGUF, manifest, ONNX or image must end in an answer or an Owl2Error; never another exception, a
crash of the process or a hang. OWL2_FUZZ_SECONDS sets the budget (default 120); the README
gives the longer run."""

import pytest

pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_model_files import fuzz  # noqa: E402


def test_mutated_model_files_and_images_never_crash_hang_or_escape(tiny_model_dir, tmp_path):
    seconds = float(os.environ.get("OWL2_FUZZ_SECONDS", "120"))
    result = fuzz(tiny_model_dir, seconds, seed=int(os.environ.get("OWL2_FUZZ_SEED", "7")),
                  out=tmp_path / "findings", log=lambda line: None)
    print(f"fuzz: {result['iterations']} inputs in {seconds:.0f} s")
    assert result["iterations"] > 100
    # Each kind of file was reached, and most mutations were refused, not ignored.
    targets = {target for target, _ in result["outcomes"]}
    assert {"decoder", "mam", "manifest", "vision-fp32", "image-PNG"} <= targets
    assert not result["findings"], "\n".join(f"{t} {o}: {d} ({p})" for t, o, d, p in result["findings"])


def test_quantize_of_mutated_folders_never_crashes_hangs_escapes_or_writes_a_bad_folder(
        tiny_model_dir, tmp_path):
    """`owl2 quantize` (issue 24) on a few hundred folders with one file mutated, most without
    the manifest's file records (so the files' own checks are what refuses them): an Owl2Error,
    or a written folder that loads."""
    from fuzz_model_files import fuzz_quantize
    n = int(os.environ.get("OWL2_FUZZ_QUANTIZE", "300"))
    result = fuzz_quantize(tiny_model_dir, n, seed=int(os.environ.get("OWL2_FUZZ_SEED", "7")),
                           out=tmp_path / "findings", seconds=240, log=lambda line: None)
    print(f"fuzz quantize: {result['iterations']} folders")
    assert result["iterations"] == n
    outcomes = {outcome for _, outcome in result["outcomes"]}
    assert {"ok", "owl2error"} <= outcomes
    refused_mam = sum(k for (target, outcome), k in result["outcomes"].items()
                      if target == "mam" and outcome == "owl2error")
    assert refused_mam > n // 4  # the sidecar was reached, and mostly refused
    assert not result["findings"], "\n".join(f"{t} {o}: {d} ({p})" for t, o, d, p in result["findings"])
