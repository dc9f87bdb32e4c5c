"""`owl2 batch`'s output file, OUT.jsonl: one row per input, resumable.

    with Output.open(path, items) as out:   # reads and checks what a previous run wrote
        todo = [i for i in items if i.index not in out.done]
        out.write(result.to_row())           # one line, flushed and fsync'd

A row is done once its line, newline included, is on disk: each row is appended with one write,
then flushed and fsync'd, so a run killed at any moment loses only the rows it had not finished.
Such a kill can leave a torn last line (no newline): opening the file again drops it, and that
item is answered again. Rows already there, answers and error rows alike, are skipped by index,
after checking that each row's image and question are the input's at that index: a file written
for other inputs is refused rather than silently mixed. retry_errors=True first removes the
error rows (rewriting the file atomically) so that those items are tried again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Sequence

from owl2_edge.batch.engine import BatchItem, image_label
from owl2_edge.checks import display_path
from owl2_edge.errors import Owl2Error

try:
    import fcntl
except ImportError:  # not POSIX: no lock (two runs on one file would interleave their rows)
    fcntl = None


class OutputError(Owl2Error):
    """An output file that cannot be resumed (written for other inputs, not ours, unreadable)."""


class Output:
    def __init__(self, path: Path, file, done: dict[int, dict]):
        self.path, self._file = path, file
        self.done = done                 # index -> the row already in the file
        self.errors_before = sum("error" in row for row in done.values())

    @classmethod
    def open(cls, path: str | os.PathLike, items: Sequence[BatchItem],
             retry_errors: bool = False) -> "Output":
        path = Path(path)
        name = display_path(path)
        if path.is_dir():
            raise OutputError(f"{name}: is a folder; -o takes a .jsonl file to write")
        try:
            file = open(path, "a+b")  # created if missing; every write goes to the end
        except OSError as e:
            raise OutputError(f"{name}: cannot write it ({e.strerror or e})") from None
        try:
            _lock(file, name)
            file.seek(0)
            data = file.read()
            kept = data[:data.rfind(b"\n") + 1]      # a torn last line is everything after
            done = _check_rows(_rows(kept, name), items, name)
            if retry_errors and any("error" in row for row in done.values()):
                done = {i: row for i, row in done.items() if "error" not in row}
                file = _rewrite(path, file, [done[i] for i in sorted(done)])
            elif len(kept) < len(data):
                file.truncate(len(kept))
                os.fsync(file.fileno())
        except BaseException:
            file.close()
            raise
        return cls(path, file, done)

    def write(self, row: dict) -> None:
        self._file.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[row["index"]] = row

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(file, name: str) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{name}: another owl2 batch is writing it") from None


def _rows(data: bytes, name: str) -> list[tuple[int, dict]]:
    """(line number, row) of each whole line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{name}: not UTF-8 text, so not rows of owl2 batch; use another -o "
                          f"or delete it") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or type(row.get("index")) is not int:
            raise OutputError(f"{name}:{n}: not a row of owl2 batch; use another -o or delete it")
        rows.append((n, row))
    return rows


def _check_rows(rows, items: Sequence[BatchItem], name: str) -> dict[int, dict]:
    by_index = {item.index: item for item in items}
    done = {}
    for n, row in rows:
        item = by_index.get(row["index"])
        if item is None or row.get("image") != image_label(item.image) \
                or row.get("question") != item.question:
            raise OutputError(f"{name} was written for other inputs (line {n}, index "
                              f"{row['index']}); use another -o or delete it")
        done[item.index] = row
    return done


def _rewrite(path: Path, file, rows: list[dict]):
    """The file holding only `rows`, replaced atomically (a kill leaves the old or the new one);
    returns the new file, open for appending and locked."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as new:
        for row in rows:
            new.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        new.flush()
        os.fsync(new.fileno())
    replacement = open(tmp, "a+b")
    try:
        _lock(replacement, display_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        replacement.close()
        raise
    file.close()
    return replacement


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
