"""Input files the commands read whole (`--data`, `--questions`, `--images LIST.txt`, an imatrix),
opened and read so that no input can hang a command or fill its memory.

    path = regular_file("data", "q.jsonl")             # the path, checked to be a regular file
    for line in lines("data", "q.jsonl"):              # Line(number, text, not_utf8)
        row = json_object(line, where=f"q.jsonl:{line.number}")

- Only a regular file is read: a FIFO, a device (/dev/zero), a socket or a folder is refused in
  one line. The file is opened with O_NONBLOCK, so opening a FIFO with no writer returns at once
  instead of blocking, and then checked with fstat: what was opened is what is judged.
- At most max_bytes are read, whatever the file claims (it may grow while read), and no line may
  be longer than max_line bytes.
- A line is decoded on its own. Bytes that are not UTF-8 do not stop the file: they are kept as
  lone surrogates (Python's surrogateescape) and the line says so (Line.not_utf8), so a caller
  can refuse that line alone, with its number (owl2 batch writes an error row for it).
- A JSON line's nesting is counted before json.loads sees it: the stdlib parser recurses once
  per level and a line of 200,000 brackets would raise RecursionError.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from owl2_edge import checks
from owl2_edge.checks import display_path
from owl2_edge.errors import ArgumentError

# A JSONL row is an object of a few strings; nothing in any input format nests deeper than this.
MAX_JSON_DEPTH = 32
# A line is a path, or a question with its answers: a megabyte is already far too long.
MAX_LINE_BYTES = 2**20
_READ_CHUNK = 2**20


@dataclass(frozen=True)
class Line:
    number: int            # 1-based
    text: str              # decoded with surrogateescape: bytes that are not UTF-8 are U+DC80..FF
    not_utf8: str | None   # why the line is not UTF-8 ("byte 0xff at column 7"), else None


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def open_regular(name: str, path: str | os.PathLike, max_bytes: int,
                 what: str = "file") -> tuple[int, Path]:
    """A read-only descriptor of `path`, which must be a regular file of at most max_bytes;
    the caller closes it. Every refusal is an ArgumentError naming the file (`what` it should
    be says what is missing)."""
    path = Path(checks.path(name, path))
    shown = display_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArgumentError(f"{shown}: no such {what}") from None
    except IsADirectoryError:
        raise ArgumentError(f"{shown}: is a folder, not a file") from None
    except OSError as e:
        raise ArgumentError(f"{shown}: cannot read it ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        kind = file_kind(info.st_mode)
        if kind is not None:
            raise ArgumentError(f"{shown}: is {kind}, not a regular file")
        if info.st_size > max_bytes:
            raise ArgumentError(f"{shown}: larger than {_size(max_bytes)}")
    except BaseException:
        os.close(fd)
        raise
    return fd, path


def regular_file(name: str, path: str | os.PathLike, max_bytes: int, what: str = "file") -> Path:
    """`path` checked as open_regular checks it, for readers that open it themselves (a memory
    map): a FIFO or a device never reaches them."""
    fd, path = open_regular(name, path, max_bytes, what)
    os.close(fd)
    return path


def read_bytes(name: str, path: str | os.PathLike, max_bytes: int) -> tuple[bytes, Path]:
    """The whole of a regular file, never more than max_bytes (a file growing while read is
    refused rather than followed)."""
    fd, path = open_regular(name, path, max_bytes)
    chunks, total = [], 0
    try:
        while True:
            try:
                chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total))
            except OSError as e:
                raise ArgumentError(f"{display_path(path)}: cannot read it "
                                    f"({e.strerror or e})") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ArgumentError(f"{display_path(path)}: larger than {_size(max_bytes)}")
    finally:
        os.close(fd)
    return b"".join(chunks), path


def lines(name: str, path: str | os.PathLike, max_bytes: int,
          max_line: int = MAX_LINE_BYTES) -> tuple[list[Line], Path]:
    """The lines of a text file (\\n, \\r\\n or \\r ends them), each decoded on its own."""
    data, path = read_bytes(name, path, max_bytes)
    out = []
    for n, raw in enumerate(data.splitlines(), start=1):
        if len(raw) > max_line:
            raise ArgumentError(f"{display_path(path)}:{n}: line longer than {_size(max_line)}")
        try:
            text, bad = raw.decode("utf-8"), None
        except UnicodeDecodeError as e:
            text = raw.decode("utf-8", "surrogateescape")
            bad = f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
        out.append(Line(n, text, bad))
    return out, path


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deep the brackets of a JSON text nest, strings left out (a bracket inside a string
    does not nest). Malformed text gets some number: json.loads judges it afterwards."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def json_value(text: str, where: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads of one line, its nesting bounded first. Errors name `where`."""
    if json_depth(text) > max_depth:
        raise ArgumentError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except ValueError:
        raise ArgumentError(f"{where}: not valid JSON") from None
    except RecursionError:  # cannot happen below max_depth; kept one line if it ever does
        raise ArgumentError(f"{where}: JSON nested too deep") from None


def unicode_problem(line: Line | None, values: dict[str, object]) -> str | None:
    """Why the text a row uses is not valid Unicode, or None. `values`: the row's fields that are
    used (name -> str, list of str or None); a lone surrogate in one (from a "\\ud800" escape in
    the JSON, or from bytes that are not UTF-8: a line's, or a file name's) cannot be tokenized,
    shown or written out. `line`: where the values were read, if from a file's line."""
    for key, value in values.items():
        for text in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                if line is not None and line.not_utf8 is not None:
                    return line.not_utf8
                return (f"\"{key}\" is not valid Unicode (a lone surrogate "
                        f"U+{ord(text[e.start]):04X} at character {e.start + 1})")
    return None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 2**20 and n % 2**20 == 0 else f"{n} bytes"

