"""Output files the commands write (`owl2 imatrix -o`, `owl2 batch -o`), so that a bad -o is one
line, never a traceback, and never a write or a rename over something that is not a file.

    check_target(path, replace=force)          # before the long work: refuse now, not after it
    with replacing(path) as tmp:               # a temporary file beside it...
        write_everything_to(tmp)               # ...renamed over path once complete and synced
    fd = open_append(path)                     # owl2 batch: append to a regular file
    write_all(fd, data, path)                  # every byte written and fsync'd, or OutputError

- The target must be a regular file or absent. A folder, a device (/dev/null, /dev/sda), a FIFO
  or a socket is refused, symlinks followed: writing to a device or renaming over a device node
  (as root) is never what -o meant.
- An existing file is replaced only when the caller says so (`--force`); owl2 batch appends to
  its own output by design (resuming).
- A complete file appears under its name only once written and fsync'd (a temporary file in the
  same folder, then rename); a failure removes the temporary file. Disk full and failed fsyncs
  are OutputErrors with one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from owl2_edge import checks
from owl2_edge.checks import display_path
from owl2_edge.errors import Owl2Error
from owl2_edge.textfiles import file_kind


class OutputError(Owl2Error):
    """An output path that cannot be written: a folder or a device, a file not to be replaced,
    a full disk, or (owl2 batch) a file that is not a resumable output of the same inputs."""


def reason(e: OSError) -> str:
    """An OSError in words for a one-line message."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    return e.strerror or str(e) or type(e).__name__


def check_target(path: str | os.PathLike, replace: bool, option: str = "-o") -> Path:
    """`path` as a file to (re)write: refused if it is a folder or a special file, or if it is an
    existing file and not `replace`, or if its folder is missing."""
    path = Path(checks.path(option, path))
    shown = display_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():  # is_dir follows symlinks, as the write will
            raise OutputError(f"{option} {shown}: its folder does not exist") from None
        return path
    except OSError as e:
        raise OutputError(f"{option} {shown}: cannot use it ({reason(e)})") from None
    kind = file_kind(mode)
    if kind is not None:
        raise OutputError(f"{option} {shown}: is {kind}; give the path of a file to write")
    if not replace:
        raise OutputError(f"{option} {shown}: already exists; give --force to replace it")
    return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, replace: bool, option: str = "-o") -> Iterator[Path]:
    """A temporary path beside `path` to write the whole output to; on a clean exit it is
    fsync'd and renamed to `path` (rename replaces a symlink itself, never what it points to).
    `path` is checked again just before the rename, as anything may have appeared there."""
    path = check_target(path, replace, option)
    shown = display_path(path)
    fd, tmp = temporary_beside(path, option)
    os.close(fd)
    try:
        try:
            yield tmp
        except OSError as e:
            raise OutputError(f"cannot write {shown} ({reason(e)})") from None
        sync_file(tmp, shown)
        check_target(path, replace, option)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write {shown} ({reason(e)})") from None
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_beside(path: Path, option: str = "-o") -> tuple[int, Path]:
    """A new, empty file in `path`'s folder (so a rename to `path` is atomic), read-write: its
    descriptor and path. Made with O_EXCL and a random name, so it never writes through an
    existing link, and with mode 0o666 less the umask, as open() would make `path`."""
    name = f".{path.name[:200]}.{{}}.part"
    for _ in range(16):
        tmp = path.with_name(name.format(secrets.token_hex(4)))
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"{option} {display_path(path)}: cannot write beside it "
                              f"({reason(e)})") from None
        return fd, tmp
    raise OutputError(f"{option} {display_path(path)}: cannot make a temporary file beside it")


def sync_file(path: Path, shown: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {shown} (fsync: {reason(e)})") from None


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; a file system that cannot sync a folder is let be."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_append(path: str | os.PathLike, option: str = "-o") -> int:
    """A descriptor of `path`, created if missing, read-write with every write at its end.
    Refused like check_target (an existing file is kept: appending is the point), and judged
    again after opening (O_NONBLOCK: a FIFO cannot block the open)."""
    path = check_target(path, replace=True, option=option)
    shown = display_path(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        raise OutputError(f"{option} {shown}: cannot write it ({reason(e)})") from None
    kind = file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise OutputError(f"{option} {shown}: is {kind}; give the path of a file to write")
    return fd


def write_all(fd: int, data: bytes, shown: str, sync: bool = True) -> None:
    """Every byte of `data` written (os.write may write part), then fsync'd."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError as e:
        raise OutputError(f"cannot write {shown} ({reason(e)})") from None
