"""The group costs `owl2 quantize --target-size` measured, kept on disk between runs
(docs/quantize.md, "Kept sensitivities"): a second target size on the same source, or the same
one again, or a run cut short by Ctrl-C and started over, measures only what no run measured.

A cost is the mean KL of one group of matrices at one type against the source, on the
calibration questions (tools/choose.py). It depends on the source's weights, the importance
matrix the type is rounded with, the calibration questions as the source answered them, and
where and how the passes run (device, KV type, fused attention); it does not depend on the
target size or on --estimate. So the file is named by a digest of those four, and holds one cost
per (group, type), the group named by its tensors' pattern too (the bands of a model decide
which layers a group holds).

    costs = KeptCosts.open(source_digest(...), importance_digest(...), probe_digest(...))
    costs.get(group, "Q4_K")        # None when never measured
    costs.put(group, "Q4_K", 1e-5)  # written at once: a run killed after it keeps it

The file is rewritten whole after each new cost, through a temporary file and a rename, so a
kill at any moment leaves the last complete file. A file that cannot be read is measured
afresh (and replaced), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from owl2_edge.model_dir import cache_folder, sampled_file_digest

FORMAT = 1
FOLDER_ENV = "OWL2_SENSITIVITY_DIR"


def kept_costs_folder() -> Path:
    """$OWL2_SENSITIVITY_DIR, else the sensitivities folder in owl2-edge's user cache folder."""
    return Path(os.environ.get(FOLDER_ENV) or cache_folder() / "sensitivities")


def source_digest(manifest, files: list[Path]) -> str:
    """The decoder pair's identity: the sha256 the manifest records for each file (written at
    convert or quantize), else its size and sampled digest read now."""
    h = hashlib.sha256()
    for path in files:
        record = manifest.file_records.get(path.name)
        h.update(record["sha256"].encode() if record else
                 f"{path.stat().st_size}:{sampled_file_digest(path)}".encode())
    return h.hexdigest()


def importance_digest(importance) -> str:
    """The importance matrix's identity: what the quantizers read from it (each matrix's mean
    squared input), or "none"."""
    if importance is None:
        return "none"
    h = hashlib.sha256()
    for part in (importance.for_base(), importance.for_sidecar()):
        for name in sorted(part):
            h.update(name.encode())
            h.update(np.ascontiguousarray(part[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def probe_digest(questions, options) -> str:
    """The calibration questions as the passes read them (each run's token ids or image
    embeddings, the answer positions, the source's log-probabilities there) and the options
    that change the passes' numbers."""
    h = hashlib.sha256()
    for q in questions:
        for run in q.runs:
            array = np.asarray(run)
            h.update(array.dtype.str.encode() + str(array.shape).encode() + array.tobytes())
        h.update(str(q.n_answer).encode())
        h.update(np.ascontiguousarray(q.logprobs, dtype=np.float32).tobytes())
    h.update(f"{options.device}:{options.kv_type}:{options.flash_attn}:{options.n_gpu_layers}"
             .encode())
    return h.hexdigest()


class KeptCosts:
    """The costs kept for one (source, importance matrix, calibration) digest."""

    def __init__(self, path: Path, key: str, costs: dict[str, float]):
        self.path, self._key, self._costs = path, key, costs
        self.found = len(costs)  # kept from earlier runs when opened

    @classmethod
    def open(cls, source: str, importance: str, probe: str, fresh: bool = False,
             folder: Path | None = None) -> "KeptCosts":
        """The file for these digests; fresh=True starts from nothing (and replaces it)."""
        key = hashlib.sha256(f"{FORMAT}|{source}|{importance}|{probe}".encode()).hexdigest()
        path = (folder or kept_costs_folder()) / f"{key[:32]}.json"
        costs: dict[str, float] = {}
        if not fresh:
            try:
                data = json.loads(path.read_text())
                if data.get("format") == FORMAT and data.get("key") == key:
                    costs = {str(k): float(v) for k, v in data["costs"].items()}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                costs = {}
        return cls(path, key, costs)

    @staticmethod
    def _name(group, type_name: str) -> str:
        return f"{group.name}|{group.pattern}|{type_name}"

    def get(self, group, type_name: str) -> float | None:
        return self._costs.get(self._name(group, type_name))

    def put(self, group, type_name: str, cost: float) -> None:
        self._costs[self._name(group, type_name)] = float(cost)
        text = json.dumps({"format": FORMAT, "key": self._key, "costs": self._costs}, indent=0)
        write_whole(self.path, lambda f: f.write(text.encode()))


def write_whole(path: Path, write) -> None:
    """`write(file)` into a file beside `path`, then renamed over it: a kill at any moment
    leaves the last complete file (the kept costs and the kept answers both write this way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


__all__ = ["FOLDER_ENV", "KeptCosts", "importance_digest", "kept_costs_folder", "probe_digest",
           "source_digest", "write_whole"]
