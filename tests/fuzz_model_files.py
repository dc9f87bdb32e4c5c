"""A mutation fuzzer over every file the runtime reads: the base and sidecar GGUF (with the
vocabulary), the manifest, the vision ONNX and the images.

Each input is one good model folder with one file mutated: byte-level (bit flips, overwritten or
inserted runs, truncation, duplicated chunks) anywhere, plus structure-aware mutations where they
reach deeper: a GGUF metadata value or tensor-info field set to a boundary value, a manifest
field replaced by a hostile JSON value. A worker process loads the folder and asks one question;
the only acceptable outcomes are an answer or an Owl2Error. Any other exception, a crash of the
worker (a signal: abort, segfault) or a hang past the time limit is a finding: its input is saved
to the output folder, and the run's exit status is 1.

    python tests/fuzz_model_files.py MODEL_DIR [--seconds 600] [--seed 1] [--out fuzz-findings]

tests/test_fuzz.py runs it for a bounded time on the tiny model in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

BOUNDARY_INTS = (0, 1, 2, 3, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                 2**63 - 1, 2**64 - 1)
HOSTILE_JSON = (0, -1, 1, 2**31, 2**64, 1e308, -1e308, 0.5, "", "x" * 5000, "\u202e\x00", None,
                True, [], {}, [[[[[]]]]], {"a": {"b": {}}}, "../../etc/passwd", "NaN")
QUESTION = "What is this?"
TIME_LIMIT = 30.0  # seconds per input before it counts as a hang


# --- Mutations ------------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    if not data:
        return bytes(rng.randbytes(rng.randint(1, 64)))
    kind = rng.choice(("flip", "overwrite", "insert", "truncate", "duplicate", "zero", "ff"))
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        n = rng.randint(1, 64)
        data[at:at + n] = rng.randbytes(n)
    elif kind == "insert":
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "truncate":
        del data[at:]
    elif kind == "duplicate":
        n = rng.randint(1, 256)
        data[at:at] = data[at:at + n]
    else:
        n = rng.randint(1, 16)
        data[at:at + n] = bytes([0 if kind == "zero" else 0xFF]) * min(n, len(data) - at)
    return bytes(data)


def gguf_fields(path: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(numbers, strings): (offset, size) of every integer-like part of the header, the metadata
    and the tensor infos, where a boundary value does the most damage; and of every string's
    bytes (key names, values, the vocabulary's tokens), to make them invalid UTF-8, empty-looking
    or duplicates of each other."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(path)
    numbers, strings = [], []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for field in fields:
        offset = field.offset
        for part in field.parts:
            part = np.asarray(part)
            if part.dtype.kind in "iuf" and part.size <= 8 and part.dtype != np.uint8:
                numbers.append((offset, part.nbytes))
            elif part.dtype == np.uint8 and part.size:
                strings.append((offset, part.nbytes))
            offset += part.nbytes
    return numbers, strings


def mutate_gguf(data: bytes, fields, rng: random.Random) -> bytes:
    numbers, strings = fields
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    data = bytearray(data)
    if strings and rng.random() < 0.4:
        offset, size = rng.choice(strings)
        kind = rng.choice(("invalid-utf8", "duplicate", "nul"))
        if kind == "invalid-utf8":
            data[offset + rng.randrange(size)] = rng.choice((0xFF, 0xC0, 0x80, 0xED))
        elif kind == "nul":
            data[offset:offset + size] = bytes(size)
        else:  # the same bytes as another string of the same length (a duplicate token)
            twins = [o for o, s in strings if s == size and o != offset]
            if twins:
                other = rng.choice(twins)
                data[offset:offset + size] = data[other:other + size]
        return bytes(data)
    if not numbers:
        return mutate_bytes(bytes(data), rng)
    offset, size = rng.choice(numbers)
    value = rng.choice(BOUNDARY_INTS) if rng.random() < 0.8 else rng.getrandbits(8 * size)
    if rng.random() < 0.2:  # or a float's extremes, for the f32 fields
        raw = struct.pack("<f", rng.choice((float("inf"), float("nan"), -0.0, 1e38)))[:size]
    else:
        raw = (value % (1 << (8 * size))).to_bytes(size, "little")
    data[offset:offset + size] = raw
    return bytes(data)


def mutate_manifest(text: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(text, rng)
    manifest = json.loads(text)
    leaves = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])
        leaves.append(path)
    walk(manifest, [])
    path = rng.choice([p for p in leaves if p])
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(HOSTILE_JSON)
    return json.dumps(manifest).encode()


# A manifest's file records (model_dir.file_record) refuse any change to a file before its own
# checks run: most inputs go without them (a folder written before the records), so that those
# checks are what the fuzzer reaches; the rest keep them.
RECORDED_SHARE = 0.25


def _with_and_without_records(manifest: bytes) -> dict[bool, bytes]:
    unrecorded = json.loads(manifest)
    unrecorded.pop("file_records", None)
    return {True: manifest, False: json.dumps(unrecorded, indent=2).encode()}


# --- The worker: load, ask, report ----------------------------------------------------------------

def worker(conn, folder: str, image_path: str) -> None:
    """Answers (folder, image bytes or None) requests with ("ok"|"owl2error"|"bug", detail)."""
    import os
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from owl2_edge.errors import Owl2Error
    from owl2_edge.owl2 import Owl2
    while True:
        request = conn.recv()
        if request is None:
            return
        model, image = request
        try:
            with Owl2.load(model, device="cpu", n_ctx=256, n_threads=1) as owl:
                owl.ask(image if image is not None else image_path, QUESTION, max_tokens=2,
                        temperature=0)
            conn.send(("ok", ""))
        except Owl2Error as e:
            conn.send(("owl2error", type(e).__name__))
        except BaseException:  # noqa: BLE001  (anything else is what the fuzzer looks for)
            conn.send(("bug", traceback.format_exc(limit=8)))


def quantize_worker(conn, folder: str, out: str) -> None:
    """Answers (source folder, None) requests by quantizing it to Q8_0 into `out`, then checking
    that what was written loads: ("ok"|"owl2error"|"bug", detail). A folder written that load
    refuses is a bug too."""
    import os
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from owl2_edge.errors import Owl2Error
    from owl2_edge.owl2 import Owl2
    from owl2_edge.tools.quantize import quantize_folder
    while True:
        request = conn.recv()
        if request is None:
            return
        model, _ = request
        try:
            quantize_folder(model, out, QUANTIZE_TO, force=True)
        except Owl2Error as e:
            conn.send(("owl2error", f"{type(e).__name__}: {e}"))
            continue
        except BaseException:  # noqa: BLE001
            conn.send(("bug", traceback.format_exc(limit=8)))
            continue
        try:
            Owl2.check_folder(out)
            conn.send(("ok", ""))
        except BaseException as e:  # noqa: BLE001
            conn.send(("bug", f"quantize wrote a folder that load refuses: {type(e).__name__}: {e}"))


QUANTIZE_TO = "Q8_0"


class Worker:
    def __init__(self, folder: Path, image: Path, target=worker):
        self.args = (str(folder), str(image))
        self.target = target
        self.proc = None

    def run(self, model: Path, image: bytes | None) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=self.target, args=(child, *self.args), daemon=True)
            self.proc.start()
        self.conn.send((str(model), image))
        if self.conn.poll(TIME_LIMIT):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return "hang", f"no answer within {TIME_LIMIT:.0f} s"
        code = self.proc.exitcode
        self.proc = None
        return "crash", f"worker died with exit code {code}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)


# --- The campaign ---------------------------------------------------------------------------------

def sample_images() -> dict[str, bytes]:
    from PIL import Image
    import numpy as np
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        picture.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


def fuzz(model_dir: Path, seconds: float, seed: int, out: Path, log=print) -> dict:
    rng = random.Random(seed)
    manifest = json.loads((model_dir / "owl2.json").read_text())
    files = {"decoder": manifest["decoder_file"], "mam": manifest["mam_file"],
             "manifest": "owl2.json", **{f"vision-{v}": f for v, f in manifest["vision_files"].items()}}
    originals = {k: (model_dir / f).read_bytes() for k, f in files.items()}
    manifests = _with_and_without_records(originals["manifest"])
    spans = {k: gguf_fields(model_dir / files[k]) for k in ("decoder", "mam")}
    images = sample_images()
    targets = [*files, *(f"image-{fmt}" for fmt in images)]
    outcomes: Counter = Counter()
    findings = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(model_dir, work)
        good_image = Path(tmp) / "good.png"
        good_image.write_bytes(images["PNG"])
        runner = Worker(work, good_image)
        deadline = time.monotonic() + seconds
        iterations = 0
        try:
            while time.monotonic() < deadline:
                target = rng.choice(targets)
                image = None
                recorded = rng.random() < RECORDED_SHARE
                (work / "owl2.json").write_bytes(manifests[recorded])
                if target.startswith("image-"):
                    image = mutate_bytes(images[target[6:]], rng)
                    mutated = image
                else:
                    original = manifests[recorded] if target == "manifest" else originals[target]
                    mutated = _mutated(target, original, spans, rng)
                    (work / files[target]).write_bytes(mutated)
                outcome, detail = runner.run(work, image)
                if not target.startswith("image-"):
                    (work / files[target]).write_bytes(original)
                iterations += 1
                outcomes[(target, outcome)] += 1
                if outcome not in ("ok", "owl2error"):
                    _keep_finding(findings, out, "", target, outcome, detail, mutated, log)
        finally:
            runner.stop()
    return {"iterations": iterations, "outcomes": outcomes, "findings": findings}


def fuzz_quantize(model_dir: Path, iterations: int, seed: int, out: Path, seconds: float = 300,
                  log=print) -> dict:
    """`owl2 quantize` (quantize_folder) on `iterations` copies of `model_dir` with one file
    mutated, as fuzz() mutates them (with and without the manifest's file records). The outcomes: a written folder that loads,
    or an Owl2Error; anything else is a finding. Stops early at `seconds`."""
    rng = random.Random(seed)
    manifest = json.loads((model_dir / "owl2.json").read_text())
    files = {"decoder": manifest["decoder_file"], "mam": manifest["mam_file"],
             "manifest": "owl2.json",
             **{f"vision-{v}": f for v, f in manifest["vision_files"].items()},
             **{f"data-{v}": f for v, f in manifest.get("vision_data_files", {}).items()}}
    originals = {k: (model_dir / f).read_bytes() for k, f in files.items()}
    manifests = _with_and_without_records(originals["manifest"])
    spans = {k: gguf_fields(model_dir / files[k]) for k in ("decoder", "mam")}
    # The sidecar is the file quantize itself reads: it gets half the mutations.
    targets = ["mam"] * (len(files) - 1) + [t for t in files if t != "mam"]
    outcomes: Counter = Counter()
    findings = []
    with tempfile.TemporaryDirectory() as tmp:
        work, written = Path(tmp) / "model", Path(tmp) / "quantized"
        shutil.copytree(model_dir, work)
        runner = Worker(work, written, target=quantize_worker)
        deadline = time.monotonic() + seconds
        done = 0
        try:
            while done < iterations and time.monotonic() < deadline:
                target = rng.choice(targets)
                recorded = rng.random() < RECORDED_SHARE
                (work / "owl2.json").write_bytes(manifests[recorded])
                original = manifests[recorded] if target == "manifest" else originals[target]
                mutated = _mutated(target, original, spans, rng)
                (work / files[target]).write_bytes(mutated)
                outcome, detail = runner.run(work, None)
                (work / files[target]).write_bytes(original)
                done += 1
                outcomes[(target, outcome)] += 1
                if outcome not in ("ok", "owl2error"):
                    _keep_finding(findings, out, "quantize-", target, outcome, detail, mutated,
                                  log)
        finally:
            runner.stop()
    return {"iterations": done, "outcomes": outcomes, "findings": findings}


def _mutated(target: str, original: bytes, spans: dict, rng: random.Random) -> bytes:
    """One mutation of a file: field-aware for the GGUFs, JSON-aware for the manifest."""
    if target in spans:
        return mutate_gguf(original, spans[target], rng)
    if target == "manifest":
        return mutate_manifest(original, rng)
    return mutate_bytes(original, rng)


def _keep_finding(findings: list, out: Path, prefix: str, target: str, outcome: str,
                  detail: str, mutated: bytes, log) -> None:
    """Save the input that gave a finding beside the others, and note it."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"{prefix}{len(findings):03d}-{target}-{outcome}.bin"
    saved.write_bytes(mutated)
    findings.append((target, outcome, detail.strip().splitlines()[-1][:300], saved))
    log(f"FINDING {target} {outcome}: {findings[-1][2]} -> {saved}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    args = ap.parse_args(argv)
    result = fuzz(args.model_dir, args.seconds, args.seed, args.out)
    by_target: dict[str, Counter] = {}
    for (target, outcome), n in result["outcomes"].items():
        by_target.setdefault(target, Counter())[outcome] = n
    print(f"{result['iterations']} inputs in {args.seconds:.0f} s (seed {args.seed})")
    for target in sorted(by_target):
        print(f"  {target:14s} " + ", ".join(f"{k} {v}" for k, v in sorted(by_target[target].items())))
    print(f"{len(result['findings'])} findings")
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
