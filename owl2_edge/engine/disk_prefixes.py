"""What the engine keeps on disk for one loaded model, and finds again in a later process
(docs/cache.md): each picture's image embeddings, and the decoder's KV cells of each prompt
prefix that ends after a picture.

Keys are content, never file names (owl2_edge/disk_cache.py stores them):
  embeddings: the vision file's identity (the pair id, its sha256, the ONNX provider) and the
      picture's content key: the hash of its preprocessed pixels, so the aspect mode and EXIF
      rule that made them are part of it;
  KV cells: the decoder's identity (the pair id, both GGUF files' sha256, the device, how the
      weights run, the cache layout: layers, width, KV type, V layout; not the context size)
      and the prefix's items (token ids, pictures by content key).

A prefix is kept where a later prompt may stop sharing: right after each picture (the next
question about it) and right before each end-of-answer token that follows a picture (the turns
of a chat, resumed with its history). Entries are written by one thread, so that an answer never
waits for the disk; a process flushes what is queued before it exits.
"""

from __future__ import annotations

import atexit
import json
import queue
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from owl2_edge.decoder import KVState
from owl2_edge.disk_cache import DiskStore
from owl2_edge.kv_prefix import IMAGE, TEXT
from owl2_edge.model_dir import Manifest, sampled_file_digest

EMBEDS, KV = "embeds", "kv"

# Bytes of entries waiting for the writer at most (a 7B picture prefix is ~33 MiB); past it,
# new ones are not even saved (a cache, not a log: a server under load must not pile up copies).
PENDING_LIMIT = 256 << 20

_open: "weakref.WeakSet[DiskPrefixes]" = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for prefixes in list(_open):
        prefixes.close()


class DiskPrefixes:
    """store: the cache folder; decoder_id / vision_id: the identities above (model_identity
    builds them); eos_id: the end-of-answer token."""

    def __init__(self, store: DiskStore, decoder_id: dict, vision_id: dict, eos_id: int):
        self.store, self.eos_id = store, eos_id
        self._decoder_id = json.dumps(decoder_id, sort_keys=True)
        self._vision_id = json.dumps(vision_id, sort_keys=True)
        self._writes: queue.Queue = queue.Queue()
        self._pending = 0           # bytes queued for the writer
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written = 0            # entries this process wrote
        _open.add(self)

    # -- keys ---------------------------------------------------------------------------------------

    def _embeds_key(self, image_key: str) -> str:
        return json.dumps({"vision": self._vision_id, "image": image_key})

    def _kv_key(self, items: Sequence) -> str:
        return json.dumps({"decoder": self._decoder_id, "items": [list(item) for item in items]})

    def boundaries(self, items: Sequence, whole: bool = False) -> list[int]:
        """The item counts n at which items[:n] is kept: after each picture, and before each
        end-of-answer token that follows one. len(items) only when `whole` (a warm's: its
        question comes after it); an answer's prompt never, its last position must run."""
        out, seen_image = [], False
        for n, (kind, value) in enumerate(items):
            if kind == TEXT and value == self.eos_id and seen_image and n > 0:
                out.append(n)
            if kind == IMAGE:
                seen_image = True
                out.append(n + 1)
        return sorted({n for n in out if n < len(items) or (whole and n == len(items))})

    # -- embeddings ---------------------------------------------------------------------------------

    def embeds(self, image_key: str) -> np.ndarray | None:
        entry = self.store.get(EMBEDS, self._embeds_key(image_key))
        if entry is None:
            return None
        shape = entry.meta.get("shape")
        try:
            return np.frombuffer(entry.payload, dtype=np.float32).reshape(shape)
        except (TypeError, ValueError):
            return None

    def put_embeds(self, image_key: str, embeds: np.ndarray) -> None:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        self._queue(EMBEDS, self._embeds_key(image_key),
                    lambda: ({"shape": list(embeds.shape)}, [embeds.tobytes()]), embeds.nbytes)

    # -- KV prefixes --------------------------------------------------------------------------------

    def find(self, items: Sequence, longer_than: int = 0) -> tuple[int, KVState] | None:
        """The longest kept prefix of `items` longer than `longer_than` items: (its item count,
        the state to restore), or None."""
        candidates = [n for n in reversed(self.boundaries(items)) if n > longer_than]
        found = None
        for n in candidates:  # get() reads the file or finds none: no stat before it
            entry = self.store.get(KV, self._kv_key(items[:n]), count=False)
            state = _state_of(entry) if entry is not None else None
            if state is not None:
                found = n, state
                break
        if candidates:
            self.store.count(KV, hit=found is not None)  # one lookup, whatever it tried
        return found

    def missing(self, items: Sequence, longer_than: int = 0, whole: bool = False) -> list[int]:
        """The boundaries of `items` past `longer_than` items that have no entry yet."""
        return [n for n in self.boundaries(items, whole)
                if n > longer_than and not self.store.has(KV, self._kv_key(items[:n]))]

    @property
    def busy(self) -> bool:
        """Whether the writer is PENDING_LIMIT behind: the engine then saves nothing new."""
        return self._pending >= PENDING_LIMIT

    def put_state(self, items: Sequence, state: KVState) -> None:
        """Keep `state` (the KV cells of exactly `items`) for later processes."""
        def entry():
            parts = state.parts()
            return ({"n_past": state.n_past, "layout": state.layout,
                     "part_bytes": [len(p) for p in parts]}, parts)
        self._queue(KV, self._kv_key(list(items)), entry, state.nbytes)

    # -- the writer ---------------------------------------------------------------------------------

    def _queue(self, kind: str, key: str, entry, nbytes: int) -> None:
        """entry(): (meta, payload parts), called on the writer's thread."""
        with self._lock:
            if self._pending + nbytes > PENDING_LIMIT:
                return
            self._pending += nbytes
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_all, name="owl2-cache-writer",
                                                daemon=True)
                self._writer.start()
        self._writes.put((kind, key, entry, nbytes))

    def _write_all(self) -> None:
        while True:
            work = self._writes.get()
            try:
                if work is None:
                    return
                kind, key, entry, nbytes = work
                try:
                    if self.store.put(kind, key, *entry()):
                        self.written += 1
                except Exception:  # a full or read-only disk, whatever failed: the answers
                    pass           # are not affected, and the writer must live (flush waits)
                finally:
                    with self._lock:
                        self._pending -= nbytes
            finally:
                self._writes.task_done()

    def flush(self) -> None:
        """Return once every queued entry is written."""
        if self._writer is not None:
            self._writes.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._writes.put(None)
            writer.join()


def identities(folder: Path, manifest: Manifest, decoder, vision, options) -> tuple[dict, dict]:
    """The decoder's and the vision model's identities as the keys above name them. A file's
    content is its sha256 as the manifest records it (checked by sampling at every load), or
    for folders written before the records, its sampled digest read now."""
    def digest(name: str) -> str:
        record = manifest.file_records.get(name)
        return record["sha256"] if record else sampled_file_digest(folder / name)
    decoder_id = {"pair_id": manifest.pair_id,
                  "files": [digest(manifest.decoder_file), digest(manifest.mam_file)],
                  "device": decoder.device, "repack": options.repack,
                  "n_gpu_layers": options.n_gpu_layers if decoder.device != "CPU" else None,
                  "layout": decoder.cache_layout}
    variant = next(v for v, name in manifest.vision_files.items() if name == vision.path.name)
    data = manifest.vision_data_files.get(variant)  # where the variant keeps its weights
    vision_id = {"pair_id": manifest.pair_id,
                 "files": [digest(vision.path.name), *([digest(data)] if data else [])],
                 "provider": vision.provider}
    return decoder_id, vision_id


def _state_of(entry) -> KVState | None:
    meta = entry.meta
    parts_sizes = meta.get("part_bytes")
    n_past, layout = meta.get("n_past"), meta.get("layout")
    if not isinstance(n_past, int) or not isinstance(layout, str) or not isinstance(parts_sizes, list):
        return None
    parts, offset = [], 0
    for size in parts_sizes:
        if not isinstance(size, int) or size < 0:
            return None
        parts.append(entry.payload[offset:offset + size])
        offset += size
    if offset != len(entry.payload):
        return None
    try:
        return KVState.from_parts(n_past, layout, parts)
    except Exception:  # the native refusal of a malformed state: a miss like any damage
        return None


__all__ = ["DiskPrefixes", "EMBEDS", "KV"]
