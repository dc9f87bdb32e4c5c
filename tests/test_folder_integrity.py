"""The manifest's file records (issue 24): a swapped, truncated or altered file that would still
open and answer, wrongly, is refused at every load in one line naming it; `owl2 info --verify`
reads every byte; folders written before the records still open; `owl2 info` on a pair id that
is not UTF-8 is one line.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

sys.path.insert(0, str(Path(__file__).parent))
from test_hostile_gguf import VT, rewrite, set_key  # noqa: E402

from owl2_edge import gguf_names, model_dir, names  # noqa: E402
from owl2_edge.errors import ModelFolderError  # noqa: E402
from owl2_edge.model_dir import Manifest  # noqa: E402
from owl2_edge.owl2 import Owl2  # noqa: E402
from owl2_edge.tools.info import gguf_summary  # noqa: E402
from owl2_edge.tools.quantize import quantize_folder  # noqa: E402

MISMATCH = "does not match the manifest: swapped, truncated or altered"


@pytest.fixture(scope="module")
def variants_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with three vision variants, each with its data file."""
    out = tmp_path_factory.mktemp("integrity") / "tiny-Q8_0"
    quantize_folder(tiny_model_dir, out, "Q8_0", vision=["fp32", "int8", "fp16"])
    return out


@pytest.fixture
def folder(variants_dir, tmp_path) -> Path:
    return Path(shutil.copytree(variants_dir, tmp_path / "model"))


def refused(folder: Path) -> str:
    with pytest.raises(ModelFolderError) as e:
        Owl2.load(folder, device="cpu", n_ctx=64)
    assert "\n" not in str(e.value)
    return str(e.value)


def without_records(folder: Path) -> None:
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    del manifest["file_records"]
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_the_converter_records_every_file(tiny_model_dir):
    manifest = Manifest.load(tiny_model_dir)
    assert set(manifest.file_records) == set(manifest.files())
    for name, record in manifest.file_records.items():
        data = (tiny_model_dir / name).read_bytes()
        assert record["size"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        # The tiny files are under WHOLE_FILE_BYTES: a load digests them whole.
        assert record["sampled_sha256"] == record["sha256"]


@pytest.mark.parametrize("how", ["copy", "symlink"])
@pytest.mark.parametrize("other", ["fp32", "fp16"])
def test_another_variants_data_file_is_refused(how, other, folder):
    """The int8 graph reading the fp16 or fp32 weights runs and answers wrongly: only the record
    tells."""
    data, theirs = folder / "vision-int8.onnx.data", folder / f"vision-{other}.onnx.data"
    data.unlink()
    if how == "copy":
        shutil.copyfile(theirs, data)
    else:
        data.symlink_to(theirs.name)
    assert f"vision-int8.onnx.data: {MISMATCH}" in refused(folder)


def _zero(path: Path, at: int, n: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(n))


def _flip(path: Path, offsets) -> None:
    data = bytearray(path.read_bytes())
    for i in offsets:
        data[i] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [
    ("vision-int8.onnx.data", lambda p: _zero(p, p.stat().st_size // 2, 4096)),  # zeroed weights
    ("vision-fp32.onnx.data", lambda p: _zero(p, 0, 1 << 16)),
    ("vision-int8.onnx.data", lambda p: p.write_bytes(bytes(64) + p.read_bytes()[:-64])),  # shifted
    ("vision-int8.onnx", lambda p: _flip(p, [p.stat().st_size // 3, p.stat().st_size // 2])),
    ("vision-fp16.onnx", lambda p: _flip(p, [100, 101, 102])),
    ("mam-Q8_0.gguf", lambda p: p.write_bytes(p.read_bytes()[:-32])),  # truncated
    ("decoder-Q8_0.gguf", lambda p: _flip(p, [p.stat().st_size - 7])),  # one weight
    ("decoder-Q8_0.gguf", lambda p: p.write_bytes(p.read_bytes() + bytes(32))),  # grown
])
def test_an_altered_file_is_refused_at_open(name, damage, folder):
    damage(folder / name)
    assert f"{name}: {MISMATCH}" in refused(folder)


@pytest.mark.parametrize("other", ["fp32", "fp16"])
def test_without_records_a_swapped_data_file_is_refused_by_the_graph_s_extents(other, folder):
    """A folder written before the records: the int8 graph names where each of its weights
    lies in its data file, so another variant's data file (another size) is refused at open,
    in one line, as it once was not (it loaded and encoded wrongly)."""
    without_records(folder)
    shutil.copyfile(folder / f"vision-{other}.onnx.data", folder / "vision-int8.onnx.data")
    message = refused(folder)
    assert "vision-int8.onnx.data: has" in message and "places its weights in exactly" in message
    with pytest.raises(ModelFolderError, match="places its weights in exactly"):
        Owl2.check_folder(folder)  # every variant, as `owl2 info` and `owl2 quantize` read them


def test_a_folder_without_records_is_noted_once_and_info_record_adds_them(folder):
    without_records(folder)
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "info", str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "owl2 info --record" in notes[0], r.stderr
    assert r.stderr.strip() == notes[0]
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):  # the API says it once per folder and process, not per load
            Owl2.load(folder, device="cpu", n_ctx=64).close()
    assert [type(w.message) for w in seen] == [model_dir.UnrecordedFolderWarning]
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "info", "--record", str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "recorded the size and sha256 of" in r.stdout, r.stderr
    assert set(Manifest.load(folder).verify(folder).values()) == {True}
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "info", "--record", str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "recorded already" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("vision-int8.onnx.data"), "must record every file of the folder"),
    (lambda r: r.update({"extra.bin": r["vision-int8.onnx"]}), "must record every file"),
    (lambda r: r["mam-Q8_0.gguf"].update(sha256="XYZ"), "64 lowercase hexadecimal digits"),
    (lambda r: r["mam-Q8_0.gguf"].update(size=-1), "size must be between 0"),
    (lambda r: r["mam-Q8_0.gguf"].pop("sampled_sha256"), "must hold size, sha256 and sampled"),
    (lambda r: r["mam-Q8_0.gguf"].update(size=True), "size must be an integer"),
])
def test_malformed_records_are_one_line(edit, message, folder):
    manifest = json.loads((folder / names.MANIFEST_FILE).read_text())
    edit(manifest["file_records"])
    (folder / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert message in refused(folder)


def test_a_folder_without_records_still_opens(folder):
    without_records(folder)
    assert Owl2.check_folder(folder).file_records == {}
    assert set(Manifest.load(folder).verify(folder).values()) == {None}


def test_a_large_file_is_sampled_and_verify_reads_it_whole(tmp_path, monkeypatch):
    """Over WHOLE_FILE_BYTES a load reads SAMPLE_BLOCKS blocks: a change between them passes the
    load, and only the full sha256 sees it."""
    path = tmp_path / "big.bin"
    size = model_dir.WHOLE_FILE_BYTES + 12345
    path.write_bytes(os.urandom(size))
    record = model_dir.file_record(path)
    assert record["sampled_sha256"] != record["sha256"]
    step = (size - model_dir.SAMPLE_BLOCK_BYTES) // (model_dir.SAMPLE_BLOCKS - 1)
    _flip(path, [step // 2])  # between the first two sampled blocks
    model_dir._check_record(path, record)  # not seen
    assert model_dir.file_record(path)["sha256"] != record["sha256"]
    _flip(path, [step // 2, step + 10])  # back, and into the second block
    with pytest.raises(ModelFolderError, match=MISMATCH):
        model_dir._check_record(path, record)

    class Counted:  # what a load reads of the file: a few hundred KiB, not the file
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def seek(self, at):
            self.f.seek(at)

        def read(self, n):
            data = self.f.read(n)
            self.read_bytes += len(data)
            return data
    with open(path, "rb") as f:
        counted = Counted(f)
        model_dir.sampled_digest(counted, size)
    assert counted.read_bytes == model_dir.SAMPLE_BLOCKS * model_dir.SAMPLE_BLOCK_BYTES <= 1 << 20


def _owl2(*args, prelude="", timeout=120):
    code = f"import sys; {prelude}from owl2_edge.cli import main; sys.argv[0] = 'owl2'; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_info_verify_finds_a_change_outside_the_sampled_blocks(tiny_model_dir, tmp_path):
    """Every file sampled (WHOLE_FILE_BYTES 0, in the writer and the reader), one weight of the
    F32 decoder (600 KB: gaps between its blocks) changed where no sampled block reads: info
    passes it, --verify names it."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    without_records(folder)  # recorded again with every file sampled
    prelude = "import owl2_edge.model_dir as m; m.WHOLE_FILE_BYTES = 0; "
    write = ("from owl2_edge.model_dir import Manifest; p = sys.argv[1]; "
             "Manifest.load(p).recorded(p).write(p)")
    subprocess.run([sys.executable, "-c", "import sys; " + prelude + write, folder], check=True)
    decoder = folder / "decoder-F32.gguf"
    last, n = decoder.stat().st_size - model_dir.SAMPLE_BLOCK_BYTES, model_dir.SAMPLE_BLOCKS
    gap = last * (n - 2) // (n - 1) + model_dir.SAMPLE_BLOCK_BYTES, last * (n - 1) // (n - 1)
    assert gap[1] - gap[0] > 64
    at = (gap[0] + gap[1]) // 2 // 4 * 4  # the low byte of a float32 weight near the end
    _flip(decoder, [at])
    r = _owl2("info", folder, prelude=prelude)
    assert r.returncode == 0, r.stderr
    r = _owl2("info", folder, "--verify", prelude=prelude)
    assert r.returncode == 1
    assert "vision-fp32.onnx.data: matches the manifest's sha256" in r.stdout
    assert "decoder-F32.gguf: DOES NOT MATCH" in r.stdout
    assert r.stderr.strip().splitlines() == [
        "error: decoder-F32.gguf: not the file the manifest records (altered or swapped); "
        "copy or convert the model folder again"]


def test_info_verify_on_a_good_folder(folder):
    r = _owl2("info", folder, "--verify")
    assert r.returncode == 0, r.stderr
    for name in Manifest.load(folder).files():
        assert f"{name}: matches the manifest's sha256" in r.stdout


@pytest.mark.parametrize("which", ["mam", "decoder"])
@pytest.mark.parametrize("value", [b"\xff\xfe", b"tiny-\xc0\xafpair"])
def test_info_on_a_pair_id_that_is_not_utf8_is_one_line(which, value, folder, tmp_path):
    without_records(folder)
    manifest = Manifest.load(folder)
    path = folder / (manifest.mam_file if which == "mam" else manifest.decoder_file)
    rewrite(path, tmp_path / "edited.gguf",
            set_key(gguf_names.KEY_PAIR_ID, VT.STRING, value)).replace(path)
    with pytest.raises(ModelFolderError, match="not UTF-8"):
        gguf_summary(path)
    r = _owl2("info", folder)
    assert r.returncode == 1
    # (the folder has no records: the load's one note comes first)
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
