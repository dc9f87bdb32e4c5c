"""The cache on disk: entries that outlive the process, shared by every process of the user
(docs/cache.md).

    store = DiskStore(default_cache_dir(), max_bytes=2 << 30)
    store.put("embeds", key, meta, [payload bytes, ...])
    entry = store.get("embeds", key)        # Entry(meta, payload) or None

An entry is one file named by the sha256 of its key, never by a picture's file name:

    <sha256(key)>.<kind>:  MAGIC | header length (4 bytes, little-endian) | sha256 of the header
                           | header | payload

The header (JSON) holds the format version, the kind, the whole key, the payload's size and
sha256, and what the caller said about the payload (meta). A reader checks every one of those:
a truncated, corrupted, foreign or stale entry is a miss (and a damaged one is removed), never
an error. Writers write a private temporary file and rename it into place, so a reader sees a
whole entry or none, whatever crashes. Past max_bytes, the least recently used entries go (a hit
touches its entry's time). The folder is the user's alone (0700, files 0600): entries are
derived from the user's pictures.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from owl2_edge.errors import ArgumentError
from owl2_edge.model_dir import cache_folder

CACHE_ENV = "OWL2_CACHE_DIR"
DEFAULT_CACHE_BYTES = 2 << 30
MAGIC = b"OWL2-EDGE-CACHE\n"
FORMAT_VERSION = 1
KINDS = ("embeds", "kv")
_HEADER_LIMIT = 1 << 24           # a header longer than this is damage, not a key
_DIGEST = 32                      # sha256's bytes
_STATS_FILE, _LOCK_FILE = "stats.json", ".lock"
_TEMP_PREFIX = ".tmp-"
_STALE_TEMP_SECONDS = 3600        # a temporary file this old was left by a crashed writer


def default_cache_dir() -> Path:
    """$OWL2_CACHE_DIR, else the prefixes folder in owl2-edge's user cache folder (XDG)."""
    return Path(os.environ.get(CACHE_ENV) or cache_folder() / "prefixes")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "tib": 1 << 40, "tb": 1000 ** 4}


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from "2GiB", "500MB", "1.5g" or a number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ArgumentError(f"{what} {text!r} is not a size (e.g. 2GiB, 500MB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 0:
        raise ArgumentError(f"{what} must not be negative")
    return value


def human_size(n: int) -> str:
    """Bytes for people: 1.5 GiB, 37.2 MiB, 912 KiB, 40 B."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class Entry:
    meta: dict          # what the writer said about the payload
    payload: bytes


class DiskStore:
    """One cache folder. Safe for many threads and processes at once: no operation needs a lock
    except the counters (stats.json) and eviction, which take the folder's lock file."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_bytes, "the cache size")
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.folder.is_dir():
                raise NotADirectoryError(self.folder)
        except OSError as e:
            raise ArgumentError(f"cache folder {self.folder}: {e.strerror or e}") from None

    def path(self, kind: str, key: str) -> Path:
        if kind not in KINDS:
            raise ArgumentError(f"unknown cache entry kind {kind!r}")
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.{kind}"

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry is there (not checked: get() checks)."""
        return self.path(kind, key).is_file()

    # -- reading ------------------------------------------------------------------------------------

    def get(self, kind: str, key: str, count: bool = True) -> Entry | None:
        """The entry, checked whole; None when there is none or it is not whole and right.
        count: add the lookup to the hit counters (False: the caller counts)."""
        path = self.path(kind, key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            if count:
                self.count(kind, hit=False)
            return None
        entry = _parse(data, kind, key)
        if not isinstance(entry, Entry):
            if entry == DAMAGED:
                with contextlib.suppress(OSError):
                    path.unlink()
            if count:
                self.count(kind, hit=False)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first
        if count:
            self.count(kind, hit=True)
        return entry

    # -- writing ------------------------------------------------------------------------------------

    def put(self, kind: str, key: str, meta: dict, parts: list[bytes]) -> int:
        """Write an entry (replacing one of the same key); returns its bytes on disk. Then
        evicts past max_bytes. An entry larger than max_bytes is not written (returns 0)."""
        path = self.path(kind, key)
        digest, size = hashlib.sha256(), 0
        for part in parts:
            digest.update(part)
            size += len(part)
        header = json.dumps({"version": FORMAT_VERSION, "kind": kind, "key": key,
                             "payload_bytes": size, "sha256": digest.hexdigest(),
                             "meta": meta}, separators=(",", ":")).encode()
        preamble = MAGIC + len(header).to_bytes(4, "little") + hashlib.sha256(header).digest()
        total = len(preamble) + len(header) + size
        if total > self.max_bytes:
            return 0
        fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.folder)  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(preamble + header)
                for part in parts:
                    f.write(part)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self.evict()
        return total

    def evict(self, max_bytes: int | None = None) -> int:
        """Remove least recently used entries until the folder holds at most max_bytes (default:
        this store's bound); returns how many went. Temporary files of crashed writers go too."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        removed = 0
        with self._locked():
            entries, total = [], 0
            now = time.time()
            for path, st in self._files():
                if path.name.startswith(_TEMP_PREFIX):
                    if now - st.st_mtime > _STALE_TEMP_SECONDS:
                        with contextlib.suppress(OSError):
                            path.unlink()
                    continue
                entries.append((st.st_mtime, path, st.st_size))
                total += st.st_size
            for _, path, size in sorted(entries):
                if total <= limit:
                    break
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
                total -= size
        return removed

    def clear(self) -> int:
        """Remove every entry and the counters; returns how many entries went."""
        removed = self.evict(0)
        with self._locked(), contextlib.suppress(OSError):
            (self.folder / _STATS_FILE).unlink()
        return removed

    # -- what is there ------------------------------------------------------------------------------

    def info(self) -> dict:
        """Entries and bytes per kind, the bound, and the hit counters of every process."""
        kinds = {kind: {"entries": 0, "bytes": 0} for kind in KINDS}
        for path, st in self._files():
            kind = path.suffix[1:]
            if kind in kinds and not path.name.startswith(_TEMP_PREFIX):
                kinds[kind]["entries"] += 1
                kinds[kind]["bytes"] += st.st_size
        counts = self._read_counts()
        for kind in KINDS:
            hits, misses = counts.get(kind, {}).get("hits", 0), counts.get(kind, {}).get("misses", 0)
            kinds[kind].update(hits=hits, misses=misses,
                               hit_rate=round(hits / (hits + misses), 4) if hits + misses else None)
        return {"folder": str(self.folder), "max_bytes": self.max_bytes,
                "entries": sum(k["entries"] for k in kinds.values()),
                "bytes": sum(k["bytes"] for k in kinds.values()), "kinds": kinds}

    def count(self, kind: str, hit: bool) -> None:
        """Add a lookup to the counters that `owl2 cache info` shows (best effort: a folder that
        cannot be written does not stop an answer)."""
        with contextlib.suppress(OSError), self._locked():
            counts = self._read_counts()
            field = "hits" if hit else "misses"
            counts.setdefault(kind, {}).setdefault(field, 0)
            counts[kind][field] += 1
            fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.folder)
            with os.fdopen(fd, "w") as f:
                json.dump(counts, f)
            os.replace(temp, self.folder / _STATS_FILE)

    def _read_counts(self) -> dict:
        try:
            counts = json.loads((self.folder / _STATS_FILE).read_text())
            return counts if isinstance(counts, dict) else {}
        except (OSError, ValueError):
            return {}

    def _files(self) -> Iterator[tuple[Path, os.stat_result]]:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name in (_STATS_FILE, _LOCK_FILE):
                continue
            path = self.folder / name
            with contextlib.suppress(OSError):
                st = path.stat()
                yield path, st

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# Why a file is not the entry asked for: damaged ones are removed, foreign ones (another format
# version's, another key's under the same name) left to whoever wrote them.
DAMAGED, FOREIGN = "damaged", "foreign"


def _parse(data: bytes, kind: str, key: str) -> Entry | str:
    """The entry in a file's bytes if it is whole, of this version, this kind and this key;
    else DAMAGED or FOREIGN."""
    start = len(MAGIC) + 4 + _DIGEST
    if len(data) < start or not data.startswith(MAGIC):
        return DAMAGED
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
    if n > _HEADER_LIMIT or len(data) < start + n:
        return DAMAGED
    raw = data[start:start + n]
    if hashlib.sha256(raw).digest() != data[start - _DIGEST:start]:
        return DAMAGED
    try:
        header = json.loads(raw)
    except ValueError:
        return DAMAGED
    if not isinstance(header, dict):
        return DAMAGED
    if header.get("version") != FORMAT_VERSION or header.get("kind") != kind \
            or header.get("key") != key:
        return FOREIGN
    payload = data[start + n:]
    meta = header.get("meta")
    if len(payload) != header.get("payload_bytes") or not isinstance(meta, dict) \
            or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return DAMAGED
    return Entry(meta, payload)


__all__ = ["DiskStore", "Entry", "default_cache_dir", "parse_size", "human_size", "DEFAULT_CACHE_BYTES",
           "CACHE_ENV"]
