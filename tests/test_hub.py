"""`owl2 convert OWNER/NAME`: a Hugging Face Hub id resolves through huggingface_hub's cache, and
without a connection fails in one line that says what to do (convert/hub.py)."""

import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("huggingface_hub")

from owl2_edge.convert.hub import is_hub_id, resolve_checkpoint  # noqa: E402
from owl2_edge.errors import CheckpointError  # noqa: E402
from owl2_edge.model_dir import Manifest  # noqa: E402

REPO = "owl2-edge-tests/tiny-owl2"


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert is_hub_id("MAGAer13/mplug-owl2-llama2-7b")
    assert not is_hub_id("./models/owl2") and not is_hub_id("/abs/owl2") and not is_hub_id("owl2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "ckpt").mkdir(parents=True)
    assert not is_hub_id("local/ckpt")  # an existing folder always wins
    assert resolve_checkpoint("local/ckpt").name == "ckpt"


def _cached(hf_home, checkpoint):
    """Put `checkpoint` into a Hugging Face cache as huggingface_hub lays a download out."""
    repo = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_a_cached_hub_id_converts_offline(tiny_checkpoint, tmp_path, monkeypatch):
    _cached(tmp_path / "hf", tiny_checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "convert", REPO, "-o",
                        tmp_path / "out", "-q", "F16"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert Manifest.load(tmp_path / "out").source == REPO


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}])
def test_without_a_connection_the_error_is_one_line_naming_the_id(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CheckpointError, match="MAGAer13/mplug-owl2-llama2-7b: no such folder.*"
                                              "hf download"):
        resolve_checkpoint("MAGAer13/mplug-owl2-llama2-7b")
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "convert",
                        "MAGAer13/mplug-owl2-llama2-7b", "-o", tmp_path / "out"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "owl2 convert DIR -o OUT" in r.stderr and not (tmp_path / "out").exists()
