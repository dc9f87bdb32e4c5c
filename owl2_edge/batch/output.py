"""`owl2 batch`'s output file, OUT.jsonl: one row per input, resumable.

    with Output.open(path, items) as out:   # reads and checks what a previous run wrote
        todo = [i for i in items if i.index not in out.done]
        out.write(result.to_row())           # one line, flushed and fsync'd

A row is done once its line, newline included, is on disk: each row is appended with one write,
then flushed and fsync'd, so a run killed at any moment loses only the rows it had not finished.
Such a kill can leave a torn last line (no newline): opening the file again drops it, and that
item is answered again. Rows already there, answers and error rows alike, are skipped by index,
after checking that each row's image and question are the input's at that index: a file written
for other inputs is refused rather than silently mixed. An input with two rows there keeps one
(an answer before an error row), the file rewritten atomically. retry_errors=True first removes
the error rows (rewriting the file atomically) so that those items are tried again.

The path must be a regular file or absent (owl2_edge/outputs.py): a folder, /dev/null or another
device is refused; a full disk or a failed fsync is an OutputError, one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from owl2_edge import outputs
from owl2_edge.batch.engine import BatchItem, image_label
from owl2_edge.checks import display_path
from owl2_edge.outputs import OutputError
from owl2_edge.textfiles import MAX_JSON_DEPTH, json_depth

try:
    import fcntl
except ImportError:  # not POSIX: no lock (two runs on one file would interleave their rows)
    fcntl = None

__all__ = ["Output", "OutputError", "encode_row"]

# The longest row read back: a question (an input line, textfiles.MAX_LINE_BYTES) with its
# answer, every character of it a JSON escape at worst (encode_row).
MAX_ROW_BYTES = 16 * 2**20


def encode_row(row: dict) -> bytes:
    """A row as one line of UTF-8. Text that is not valid Unicode (a lone surrogate from an input
    row, which is written as an error row) is kept as a \\udXXX JSON escape, which reads back to
    the same text, so resuming finds the row; anything else stays readable (ensure_ascii=False)."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")


class Output:
    def __init__(self, path: Path, fd: int, done: dict[int, dict]):
        self.path, self._fd = path, fd
        self.done = done                 # index -> the row already in the file
        self.errors_before = sum("error" in row for row in done.values())

    @classmethod
    def open(cls, path: str | os.PathLike, items: Sequence[BatchItem],
             retry_errors: bool = False) -> "Output":
        fd = outputs.open_append(path)  # a folder, a device or a FIFO is refused here
        path = Path(path)
        name = display_path(path)
        try:
            _lock(fd, name)
            done, duplicated, kept, size = _read_rows(fd, items, name)
            retry = retry_errors and any("error" in row for row in done.values())
            if retry:
                done = {i: row for i, row in done.items() if "error" not in row}
            if retry or duplicated:
                fd = _rewrite(path, fd, [done[i] for i in sorted(done)])
            elif kept < size:                      # a torn last line is everything after
                os.ftruncate(fd, kept)
                os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot resume {name} ({outputs.reason(e)})") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, done)

    def write(self, row: dict) -> None:
        outputs.write_all(self._fd, encode_row(row), display_path(self.path))
        self.done[row["index"]] = row

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(fd: int, name: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{name}: another owl2 batch is writing it") from None


def _read_rows(fd: int, items: Sequence[BatchItem], name: str
               ) -> tuple[dict[int, dict], bool, int, int]:
    """The rows already in the file, read line by line (a file that is not ours fails at its
    first line, however large; memory holds one row per input): index -> row, whether an input
    had more than one row, the length of its whole lines, and its size."""
    by_index = {item.index: item for item in items}
    done, duplicated, kept = {}, False, 0
    with os.fdopen(os.dup(fd), "rb") as f:  # a duplicate: closing it leaves fd open
        f.seek(0)
        for n, line in enumerate(iter(lambda: f.readline(MAX_ROW_BYTES + 1), b""), start=1):
            if not line.endswith(b"\n") and len(line) <= MAX_ROW_BYTES:
                break                               # the torn last line of a killed run
            if line.strip():
                row = _row(line, f"{name}:{n}")
                item = by_index.get(row["index"])
                if item is None or row.get("image") != image_label(item.image) \
                        or row.get("question") != item.question:
                    raise OutputError(f"{name} was written for other inputs (line {n}, index "
                                      f"{row['index']}); use another -o or delete it")
                # Rows twice for one input (two outputs joined, a copy): one is kept, an answer
                # before an error row, else the first.
                if item.index in done:
                    duplicated = True
                    if "error" not in done[item.index]:
                        kept += len(line)
                        continue
                done[item.index] = row
            kept += len(line)
        size = f.seek(0, os.SEEK_END)
    return done, duplicated, kept, size


def _row(line: bytes, where: str) -> dict:
    row = None
    if len(line) <= MAX_ROW_BYTES:
        try:
            text = line.decode("utf-8")
            if json_depth(text) <= MAX_JSON_DEPTH:
                row = json.loads(text)
        except ValueError:  # UnicodeDecodeError included
            pass
    if not isinstance(row, dict) or type(row.get("index")) is not int:
        raise OutputError(f"{where}: not a row of owl2 batch; use another -o or delete it")
    return row


def _rewrite(path: Path, fd: int, rows: list[dict]) -> int:
    """The file holding only `rows`, replaced atomically (a kill leaves the old or the new one);
    returns the new file's descriptor, open for appending and locked."""
    name = display_path(path)
    tmp_fd, tmp = outputs.temporary_beside(path)
    try:
        outputs.write_all(tmp_fd, b"".join(encode_row(row) for row in rows), name)
        _lock(tmp_fd, name)
        outputs.check_target(path, replace=True)
        os.replace(tmp, path)
    except BaseException:
        os.close(tmp_fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    outputs.sync_folder(path.parent)
    os.close(fd)
    return tmp_fd
