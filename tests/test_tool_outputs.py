"""Output paths of `owl2 imatrix -o` and `owl2 batch -o` (owl2_edge/outputs.py): a folder, a device,
a FIFO or a symlink to one is refused in one line; an existing imatrix file is replaced only with
--force, through a temporary file and a rename; a write error (file too large, disk full, fsync)
is one line. And batch's rows: an input line that is not valid Unicode becomes an error row that
a rerun skips, and rows an output holds twice are kept once."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest

from owl2_edge import outputs
from owl2_edge.batch.engine import BatchItem
from owl2_edge.batch.inputs import question_items
from owl2_edge.batch.output import Output, OutputError, encode_row
from owl2_edge.batch.run import split_refused, write_rows
from owl2_edge.tools.bench.runner import child_env
from owl2_edge.tools.imatrix import Entry, ImportanceMatrix

from test_tool_inputs import assert_one_line_error, deadline, owl2

MODEL_OPTIONS = ("--device", "cpu", "--kv-type", "f32", "--ctx", "256", "--temperature", "0",
                 "-n", "4")


def target(kind: str, tmp_path):
    """An output path of each kind that must be refused."""
    if kind == "folder":
        (tmp_path / "out").mkdir()
        return tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(tmp_path / "out")
        return tmp_path / "out"
    if kind == "link-to-dev-null":
        os.symlink("/dev/null", tmp_path / "out")
        return tmp_path / "out"
    return {"dev-null": "/dev/null", "dev-full": "/dev/full"}[kind]


TARGETS = ["folder", "fifo", "dev-null", "dev-full", "link-to-dev-null"]
WORDS = {"folder": "is a folder", "fifo": "is a FIFO", "dev-null": "is a character device",
         "dev-full": "is a character device", "link-to-dev-null": "is a character device"}


def imatrix() -> ImportanceMatrix:
    return ImportanceMatrix(base={"blk.0.attn_q.weight": Entry(np.ones(8, np.float32), 3)},
                            datasets=["test"], chunk_count=1, chunk_size=4)


def questions(tmp_path, lines: list[bytes]):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# Lines `owl2 batch` answers with an error row naming the line (not valid Unicode).
BAD_LINES = [b'{"question": "Hi \\ud800?"}',                       # a lone surrogate escaped
             b'{"question": "Bad \xff byte"}',                     # not UTF-8
             b'{"image": "p\\udc80.png", "question": "What?"}']    # in the image path


# -- refused targets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TARGETS)
def test_imatrix_write_refuses_a_folder_or_a_device_and_leaves_it(kind, tmp_path):
    path = target(kind, tmp_path)
    with deadline(10), pytest.raises(OutputError, match=WORDS[kind]):
        imatrix().write(path, replace=True)
    if kind == "link-to-dev-null":
        assert os.readlink(path) == "/dev/null"  # not renamed over
    assert [p.name for p in tmp_path.iterdir()] == ([] if kind.startswith("dev") else ["out"])


@pytest.mark.parametrize("kind", TARGETS)
def test_batch_output_refuses_a_folder_or_a_device(kind, tmp_path):
    path = target(kind, tmp_path)
    with deadline(10), pytest.raises(OutputError, match=WORDS[kind]):
        Output.open(path, [BatchItem(0, None, "Hi?")])


def test_a_missing_folder_is_one_error(tmp_path):
    with pytest.raises(OutputError, match="its folder does not exist"):
        imatrix().write(tmp_path / "none" / "im.gguf")
    with pytest.raises(OutputError, match="its folder does not exist"):
        Output.open(tmp_path / "none" / "out.jsonl", [BatchItem(0, None, "Hi?")])


# -- replacing a file ------------------------------------------------------------------------------

def test_an_existing_imatrix_file_is_replaced_only_when_asked(tmp_path):
    path = tmp_path / "im.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists; give --force to replace it"):
        imatrix().write(path)
    assert path.read_bytes() == b"keep me"
    imatrix().write(path, replace=True)
    assert ImportanceMatrix.read(path).chunk_count == 1
    assert [p.name for p in tmp_path.iterdir()] == ["im.gguf"]  # no temporary file left


def test_replacing_a_symlink_replaces_the_link_not_its_target(tmp_path):
    real = tmp_path / "real.gguf"
    real.write_bytes(b"the target")
    os.symlink(real, tmp_path / "link.gguf")
    imatrix().write(tmp_path / "link.gguf", replace=True)
    assert real.read_bytes() == b"the target" and not (tmp_path / "link.gguf").is_symlink()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="cannot write .*out.bin \\(the disk is full\\)"):
        with outputs.replacing(path, replace=True) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_the_new_file_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        imatrix().write(tmp_path / "im.gguf")
    finally:
        os.umask(umask)
    assert (tmp_path / "im.gguf").stat().st_mode & 0o777 == 0o644


def test_write_errors_are_one_line(tmp_path):
    fd = os.open(tmp_path / "x", os.O_RDONLY | os.O_CREAT, 0o644)  # writes fail: EBADF
    try:
        with pytest.raises(OutputError, match="^cannot write x \\(Bad file descriptor\\)$"):
            outputs.write_all(fd, b"row\n", "x")
    finally:
        os.close(fd)
    assert outputs.reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert outputs.reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk is full"


def _limit_file_size():
    # A real write error: writes past RLIMIT_FSIZE fail with EFBIG once SIGXFSZ is ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))


def test_cli_batch_reports_a_failing_write_in_one_line(tmp_path):
    data = questions(tmp_path, BAD_LINES)  # error rows only: written with no model loaded
    r = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "batch", "--questions", data,
                        "-o", tmp_path / "out.jsonl"], capture_output=True, text=True,
                       timeout=60, env=child_env(), preexec_fn=_limit_file_size)
    # The progress bar's last state comes first on stderr; then the error, one line.
    *progress, last = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(line.startswith("batch ") for line in progress), r.stderr
    assert last.startswith("error: cannot write") and last.endswith("out.jsonl (File too large)")


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TARGETS)
def test_cli_imatrix_and_batch_refuse_the_target_in_one_line(kind, tmp_path):
    path = target(kind, tmp_path)
    data = questions(tmp_path, [b'{"question": "Hi?"}'])
    assert_one_line_error(owl2("imatrix", "-o", path, "--force"), WORDS[kind])
    assert_one_line_error(owl2("batch", "--questions", data, "-o", path), WORDS[kind])
    if kind == "link-to-dev-null":
        assert os.readlink(path) == "/dev/null"


def test_cli_imatrix_refuses_an_existing_file_before_loading_and_force_replaces_it(
        tiny_model_dir, tmp_path):
    out = tmp_path / "im.gguf"
    out.write_bytes(b"an older file")
    r = owl2("imatrix", "-m", tmp_path / "no-model", "-o", out)  # refused before any load
    assert_one_line_error(r, "already exists; give --force to replace it")
    assert out.read_bytes() == b"an older file"
    r = owl2("imatrix", "-m", tiny_model_dir, "--device", "cpu", "-o", out, "--prompts", 2,
             "--force", timeout=300)
    assert r.returncode == 0, r.stderr
    assert ImportanceMatrix.read(out).chunk_count == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf"]


# -- batch rows --------------------------------------------------------------------------------------

def test_a_row_that_is_not_unicode_is_written_and_read_back_as_it_was(tmp_path):
    items = question_items(questions(tmp_path, [b'{"question": "Fine?"}', *BAD_LINES]))
    todo, refused = split_refused(items)
    assert [i.index for i in todo] == [0] and [r["index"] for r in refused] == [1, 2, 3]
    out = tmp_path / "out.jsonl"
    with Output.open(out, items) as o:
        write_rows(refused, o, len(items), 0.0)
    out.read_bytes().decode("utf-8")  # every line is UTF-8
    with Output.open(out, items) as o:  # the rows match their inputs again
        assert sorted(o.done) == [1, 2, 3]
        assert o.done[1]["error"].startswith(f"{tmp_path / 'q.jsonl'}:2: \"question\" is not "
                                             f"valid Unicode")
        assert o.done[2]["error"].startswith(f"{tmp_path / 'q.jsonl'}:3: not UTF-8 text")
        assert o.done[3]["error"].startswith(f"{tmp_path / 'q.jsonl'}:4: \"image\" is not")
    assert json.loads(encode_row({"question": "Qué 🦉"})) == {"question": "Qué 🦉"}
    assert b"\xc3\xa9" in encode_row({"question": "é"})  # readable UTF-8 when it can be


def test_duplicated_rows_are_kept_once_an_answer_before_an_error(tmp_path):
    items = [BatchItem(k, None, f"Q{k}?") for k in range(3)]
    rows = [{"index": 0, "image": None, "question": "Q0?", "error": "failed"},
            {"index": 1, "image": None, "question": "Q1?", "answer": "B"},
            {"index": 0, "image": None, "question": "Q0?", "answer": "A"},
            {"index": 1, "image": None, "question": "Q1?", "answer": "B"},
            {"index": 0, "image": None, "question": "Q0?", "error": "failed again"}]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Output.open(out, items) as o:
        assert o.done == {0: rows[2], 1: rows[1]} and o.errors_before == 0
        o.write({"index": 2, "image": None, "question": "Q2?", "answer": "C"})
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r.get("answer")) for r in kept] == [(0, "A"), (1, "B"), (2, "C")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


@pytest.mark.parametrize("content", [b"x" * (17 * 2**20),                 # one endless line
                                     b'{"index": 0, "image": null, "question": "Hi?", "error": "e"}\n' + b"[" * 100_000 + b"\n",   # deep
                                     b"not a row\n" + b"y\n" * 2**20])
def test_an_output_that_is_not_ours_is_refused_at_its_first_bad_line(content, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with deadline(20), pytest.raises(OutputError, match="not a row of owl2 batch"):
        Output.open(out, [BatchItem(0, None, "Hi?")])
    assert out.read_bytes() == content


def test_cli_batch_writes_bad_rows_as_errors_and_a_rerun_goes_past_them(tiny_model_dir, tmp_path):
    data = questions(tmp_path, [b'{"question": "What is it?"}', *BAD_LINES,
                                b'{"question": "And now?"}'])
    out = tmp_path / "out.jsonl"
    args = ("batch", "-m", tiny_model_dir, *MODEL_OPTIONS, "--questions", data, "-o", out)
    r = owl2(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {row["index"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert [("error" in rows[k]) for k in range(5)] == [False, True, True, True, False]
    assert ":3: not UTF-8 text" in rows[2]["error"]
    for rerun in range(2):  # a rerun skips every row, error rows included, and writes none
        r = owl2(*args, "--json", timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["written"] == 0 and json.loads(r.stdout)["skipped"] == 5
    # A copy of the rows appended (two runs' output joined): the next run keeps each once.
    out.write_bytes(out.read_bytes() * 2)
    r = owl2(*args, "--json", timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["written"] == 0, r.stderr
    assert len(out.read_text().splitlines()) == 5
    # --retry-errors tries the refused rows again: they are refused again, as error rows.
    r = owl2(*args, "--retry-errors", "--json", timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["written"] == 3, r.stderr
    assert len(out.read_text().splitlines()) == 5
