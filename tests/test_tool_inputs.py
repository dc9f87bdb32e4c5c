"""Hostile input files for `owl2 eval`, `owl2 compare`, `owl2 imatrix` and `owl2 batch`
(owl2_edge/textfiles.py): files that never end (a FIFO, /dev/zero), folders and devices, JSON
nested 200,000 deep, text that is not valid Unicode, long lines, damaged imatrix files. Each is an
Owl2Error naming the file (and line), or through the CLI one stderr line and exit 1, never a
hang, a traceback or memory without bound; and a fuzz over imatrix and --data files."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

from owl2_edge import textfiles
from owl2_edge.batch.inputs import RefusedItem, image_items, question_items
from owl2_edge.errors import ArgumentError, Owl2Error
from owl2_edge.tools import evaluate
from owl2_edge.tools.bench.runner import child_env
from owl2_edge.tools.imatrix import Entry, ImportanceMatrix

DEEP = "[" * 200_000 + "]" * 200_000


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang, when the body blocks (a FIFO's open, an endless read)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def owl2(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "owl2_edge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=child_env())


def assert_one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in parts:
        assert part in lines[0], r.stderr


# Every reader of a JSONL file, as (name, function of the path).
JSONL_READERS = {
    "eval": lambda path: evaluate.read_items(path),
    "compare": lambda path: evaluate.read_items(path, need_answers=False),
    "batch": question_items,
}


def special(kind: str, tmp_path):
    """A path that is not a regular file: a FIFO (with no writer), a device, a folder, a
    symlink to a device or to a FIFO."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        return tmp_path / "fifo"
    if kind == "folder":
        (tmp_path / "folder.jsonl").mkdir()
        return tmp_path / "folder.jsonl"
    if kind == "link-to-device":
        os.symlink("/dev/zero", tmp_path / "zero.jsonl")
        return tmp_path / "zero.jsonl"
    if kind == "link-to-fifo":
        os.mkfifo(tmp_path / "fifo")
        os.symlink(tmp_path / "fifo", tmp_path / "pipe.jsonl")
        return tmp_path / "pipe.jsonl"
    return {"dev-zero": "/dev/zero", "dev-null": "/dev/null"}[kind]


SPECIAL = ["fifo", "dev-zero", "dev-null", "folder", "link-to-device", "link-to-fifo"]
SPECIAL_WORDS = {"fifo": "is a FIFO", "dev-zero": "is a character device",
                 "dev-null": "is a character device", "folder": "is a folder",
                 "link-to-device": "is a character device", "link-to-fifo": "is a FIFO"}


# -- files that are not regular files ----------------------------------------------------------------

@pytest.mark.parametrize("reader", JSONL_READERS)
@pytest.mark.parametrize("kind", SPECIAL)
def test_a_special_file_as_jsonl_is_refused_without_reading(reader, kind, tmp_path):
    path = special(kind, tmp_path)
    with deadline(10), pytest.raises(ArgumentError) as e:
        JSONL_READERS[reader](path)
    assert SPECIAL_WORDS[kind] in str(e.value) and "not a regular file" in str(e.value)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "link-to-device", "link-to-fifo"])
def test_a_special_file_as_image_list_or_imatrix_is_refused(kind, tmp_path):
    path = special(kind, tmp_path)
    with deadline(10):
        with pytest.raises(ArgumentError, match=SPECIAL_WORDS[kind]):
            image_items(path, "What is it?")
        with pytest.raises(ArgumentError, match=SPECIAL_WORDS[kind]):
            ImportanceMatrix.read(path)


def test_a_file_beyond_the_size_bound_is_refused_unread(tmp_path, monkeypatch):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "Hi?", "answer": "yes"}\n' * 10)
    monkeypatch.setattr(evaluate, "MAX_DATA_BYTES", 100)
    with pytest.raises(ArgumentError, match="larger than 100 bytes"):
        evaluate.read_items(data)


def test_at_most_the_bound_is_read_even_if_the_size_lies(tmp_path):
    # A file that grows while read (or a size that is wrong) is not followed past the bound.
    data = tmp_path / "q.jsonl"
    data.write_bytes(b"x" * 5000)
    with pytest.raises(ArgumentError, match="larger than 4096 bytes"):
        textfiles.read_bytes("data", data, 4096)
    assert textfiles.read_bytes("data", data, 5000)[0] == b"x" * 5000


# -- lines: length, nesting, Unicode -----------------------------------------------------------------

@pytest.mark.parametrize("reader", JSONL_READERS)
@pytest.mark.parametrize("line", [DEEP, '{"question": ' + DEEP + "}", "{" * 100_000,
                                  '{"question": "Hi?", "answer": "a", "x": ' + "[" * 33 + "]" * 33 + "}"])
def test_deep_json_is_refused_before_parsing(reader, line, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "Hi?", "answer": "yes"}\n' + line + "\n")
    with deadline(10), pytest.raises(ArgumentError, match="2: JSON nested deeper than 32 levels"):
        JSONL_READERS[reader](data)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    data = tmp_path / "q.jsonl"
    question = '[[[[{{{{"\\"' * 50 + "?"
    data.write_text(json.dumps({"question": question, "answer": "]]]"}) + "\n")
    assert evaluate.read_items(data)[0].question == question
    assert textfiles.json_depth('{"a": "[[[[[", "b": [1, [2]]}') == 3


@pytest.mark.parametrize("reader", JSONL_READERS)
def test_a_line_longer_than_the_bound_is_refused_with_its_number(reader, tmp_path):
    data = tmp_path / "q.jsonl"
    long = json.dumps({"question": "x" * textfiles.MAX_LINE_BYTES, "answer": "a"})
    data.write_text('{"question": "Hi?", "answer": "yes"}\n\n' + long + "\n")
    with pytest.raises(ArgumentError, match=r":3: line longer than 1 MiB|line 3: line longer"):
        JSONL_READERS[reader](data)


# The lines that are not valid Unicode, as the bytes in the file, and what the error says.
NOT_UNICODE = {
    "surrogate-question": (b'{"question": "Hi \\ud800?", "answer": "yes"}',
                           '"question" is not valid Unicode (a lone surrogate U+D800'),
    "low-surrogate": (b'{"question": "\\udfff", "answer": "yes"}',
                      '"question" is not valid Unicode (a lone surrogate U+DFFF'),
    "surrogate-image": (b'{"image": "a\\udc80.png", "question": "Hi?", "answer": "yes"}',
                        '"image" is not valid Unicode'),
    "invalid-utf8": (b'{"question": "Hi \xff\xfe?", "answer": "yes"}',
                     "not UTF-8 text (byte 0xff at byte 18 of the line)"),
    "overlong-utf8": (b'{"question": "\xc0\xaf", "answer": "yes"}', "not UTF-8 text (byte 0xc0"),
}


@pytest.mark.parametrize("case", NOT_UNICODE)
@pytest.mark.parametrize("reader", ["eval", "compare"])
def test_text_that_is_not_unicode_is_refused_with_its_line(case, reader, tmp_path):
    line, why = NOT_UNICODE[case]
    data = tmp_path / "q.jsonl"
    data.write_bytes(b'{"question": "Fine?", "answer": "yes"}\n' + line + b"\n")
    with pytest.raises(ArgumentError) as e:
        JSONL_READERS[reader](data)
    assert str(e.value).startswith(f"{data} line 2: {why}"), e.value
    str(e.value).encode("utf-8")  # the message itself can be printed


@pytest.mark.parametrize("case", NOT_UNICODE)
def test_batch_keeps_a_line_that_is_not_unicode_as_a_refused_item(case, tmp_path):
    line, why = NOT_UNICODE[case]
    data = tmp_path / "q.jsonl"
    data.write_bytes(b'{"question": "Fine?"}\n' + line + b'\n{"question": "After?"}\n')
    items = question_items(data)
    assert [isinstance(i, RefusedItem) for i in items] == [False, True, False]
    assert items[1].index == 1 and items[1].error.startswith(f"{data}:2: {why}")


def test_a_valid_surrogate_pair_escape_is_text_not_an_error(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "An owl \\ud83e\\udd89?", "answer": "yes"}\n')
    assert evaluate.read_items(data)[0].question == "An owl \U0001f989?"
    assert not isinstance(question_items(data)[0], RefusedItem)


def test_an_image_list_line_that_is_not_utf8_is_a_refused_item(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.png\nb\xff.png\n# c\xfe\nc.png\n")
    items = image_items(listing, "What?")
    assert [i.image.name for i in items] == ["a.png", "b\udcff.png", "c.png"]
    assert isinstance(items[1], RefusedItem) and items[1].error.startswith(f"{listing}:2: not UTF-8")
    with pytest.raises(ArgumentError, match="--question is not valid Unicode"):
        image_items(listing, "What\ud800?")


def test_a_folder_picture_whose_name_is_not_utf8_is_a_refused_item(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / os.fsdecode(b"b\xff.png")).write_bytes(b"")
    items = image_items(tmp_path, "What?")
    assert [isinstance(i, RefusedItem) for i in items] == [False, True]
    assert items[1].error.endswith("b\\xdcff.png: \"image\" is not valid Unicode (a lone "
                                   "surrogate U+DCFF at character %d)" % (len(str(tmp_path)) + 3))


# -- imatrix files ---------------------------------------------------------------------------------

def small_imatrix() -> ImportanceMatrix:
    return ImportanceMatrix(base={"blk.0.attn_q.weight": Entry(np.arange(8, dtype=np.float32), 3),
                                  "blk.0.ffn_up.weight": Entry(np.ones(16, np.float32), 5)},
                            mam={"blk.0.attn_k.weight": Entry(np.full(8, 2, np.float32), 2)},
                            datasets=["test"], chunk_count=2, chunk_size=9)


@pytest.mark.parametrize("bad", [-1.0, -1e-30, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["base", "mam"])
def test_an_imatrix_with_negative_or_non_finite_sums_is_refused(bad, where, tmp_path):
    im = small_imatrix()
    getattr(im, where)[next(iter(getattr(im, where)))].sum_sq[3] = bad
    path = im.write(tmp_path / "im.gguf")
    with pytest.raises(ArgumentError, match="holds NaN, infinite or negative values"):
        ImportanceMatrix.read(path)


@pytest.mark.parametrize("count", [-1, np.nan, np.inf])
def test_an_imatrix_with_a_bad_count_is_refused(count, tmp_path):
    im = small_imatrix()
    im.base["blk.0.attn_q.weight"].count = 12345  # a float32 found nowhere else in the file
    path = im.write(tmp_path / "im.gguf")
    data = bytearray(path.read_bytes())
    marker = np.float32(12345).tobytes()
    at = data.index(marker)
    assert data.count(marker) == 1
    data[at:at + 4] = np.float32(count).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ArgumentError, match="holds NaN, infinite or negative values"):
        ImportanceMatrix.read(path)


def test_an_imatrix_declaring_endless_arrays_is_refused_at_once(tmp_path):
    path = small_imatrix().write(tmp_path / "im.gguf")
    data = bytearray(path.read_bytes())
    # imatrix.datasets: an array of strings whose count (u64) follows its item type (8).
    key = data.index(b"imatrix.datasets")
    count_at = key + len(b"imatrix.datasets") + 4 + 4
    assert int.from_bytes(data[count_at:count_at + 8], "little") == 1
    data[count_at:count_at + 8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with deadline(10), pytest.raises(ArgumentError, match="not an importance matrix \\(arrays"):
        ImportanceMatrix.read(path)


def test_a_good_imatrix_reads_back(tmp_path):
    back = ImportanceMatrix.read(small_imatrix().write(tmp_path / "im.gguf"))
    assert back.datasets == ["test"] and back.chunk_count == 2
    np.testing.assert_array_equal(back.base["blk.0.attn_q.weight"].sum_sq, np.arange(8))
    assert back.mam["blk.0.attn_k.weight"].count == 2


# -- fuzz --------------------------------------------------------------------------------------------

def mutants(data: bytes, n: int, seed: int):
    """n damaged copies of data: bytes changed, the end cut, bytes inserted, a count made huge."""
    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data)
        how = rng.randrange(5)
        if how == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:
            del b[rng.randrange(len(b)):]
        elif how == 2:
            at = rng.randrange(len(b))
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif how == 3:
            at = rng.randrange(len(b) - 8)
            b[at:at + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (2**62).to_bytes(8, "little")])
        else:  # a structural character of JSON repeated (nesting), or a stray escape
            at = rng.randrange(len(b))
            b[at:at] = rng.choice([b"[" * 5000, b"{" * 40, b'\\ud800', b"\xed\xa0\x80", b"\n"])
        yield bytes(b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's overflowing offsets
def test_fuzz_imatrix_files_end_in_a_result_or_an_owl2_error(tmp_path):
    data = small_imatrix().write(tmp_path / "im.gguf").read_bytes()
    outcomes = {"read": 0, "refused": 0}
    path = tmp_path / "mutant.gguf"
    with deadline(120):
        for mutant in mutants(data, 400, seed=1):
            path.write_bytes(mutant)
            try:
                ImportanceMatrix.read(path)
                outcomes["read"] += 1
            except Owl2Error:
                outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["read"] > 10, outcomes


def test_fuzz_data_files_end_in_items_or_an_owl2_error(tmp_path):
    rows = [{"image": f"p{k}.png", "question": f"What is {k}?", "answer": ["a", "b"][k % 2],
             "type": "colour"} for k in range(6)] + [{"question": "Búho 🦉?", "answers": ["x"]}]
    data = "\n".join(json.dumps(r, ensure_ascii=k % 2 == 0) for k, r in enumerate(rows)).encode()
    outcomes = {"read": 0, "refused": 0}
    path = tmp_path / "mutant.jsonl"
    with deadline(120):
        for mutant in mutants(data, 300, seed=2):
            path.write_bytes(mutant)
            for read in JSONL_READERS.values():
                try:
                    read(path)
                    outcomes["read"] += 1
                except Owl2Error:
                    outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["read"] > 100, outcomes


# -- through the command line -----------------------------------------------------------------------

def command(name: str, data, tmp_path) -> list:
    """The argument list of `name` reading `data`; none needs a model to get that far."""
    return {"eval": ["eval", "--data", data],
            "compare": ["compare", tmp_path / "ref", tmp_path / "cand", "--data", data],
            "imatrix": ["imatrix", "-o", tmp_path / "im.gguf", "--data", data],
            "batch": ["batch", "--questions", data, "-o", tmp_path / "out.jsonl"]}[name]


@pytest.mark.parametrize("name", ["eval", "compare", "imatrix", "batch"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "link-to-device"])
def test_cli_refuses_a_special_file_in_one_line(name, kind, tmp_path):
    r = owl2(*command(name, special(kind, tmp_path), tmp_path))
    assert_one_line_error(r, SPECIAL_WORDS[kind], "not a regular file")
    assert not (tmp_path / "im.gguf").exists() and not (tmp_path / "out.jsonl").exists()


# In batch a line that is not Unicode is an error row, not a refusal (test_tool_outputs.py).
@pytest.mark.parametrize("name, case", [
    (name, case) for name in ["eval", "compare", "imatrix", "batch"]
    for case in ["deep", "surrogate", "invalid-utf8", "long-line"]
    if name != "batch" or case in ("deep", "long-line")])
def test_cli_refuses_a_bad_line_in_one_line(name, case, tmp_path):
    data = tmp_path / "q.jsonl"
    bad = {"deep": DEEP.encode(), "surrogate": NOT_UNICODE["surrogate-question"][0],
           "invalid-utf8": NOT_UNICODE["invalid-utf8"][0],
           "long-line": b'{"question": "' + b"x" * textfiles.MAX_LINE_BYTES + b'"}'}[case]
    data.write_bytes(b'{"question": "Fine?", "answer": "yes"}\n' + bad + b"\n")
    r = owl2(*command(name, data, tmp_path))
    why = {"deep": "JSON nested deeper than 32 levels", "surrogate": "not valid Unicode",
           "invalid-utf8": "not UTF-8 text", "long-line": "line longer than 1 MiB"}[case]
    assert_one_line_error(r, why, "2")


@pytest.mark.parametrize("args, why", [
    (["eval", "--generated", "0"], "--generated must be >= 1, not 0"),
    (["eval", "--generated", "-3"], "--generated must be >= 1, not -3"),
    (["compare", "a", "b", "--generated", "0"], "--generated must be >= 1, not 0"),
    (["imatrix", "-o", "{tmp}/im.gguf", "--prompts", "0"], "--prompts must be >= 1, not 0"),
])
def test_cli_refuses_zero_questions(args, why, tmp_path):
    r = owl2(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(r, why)
