"""The vision variants at the release's size: file size, how long they take to make and to load,
the memory a loaded one holds, images per second on the CPU, and how close their embeddings
stay to fp32's.

Model weights cannot be downloaded here, so the fp32 graph is the 7B release's vision path
(ViT-L/14 at 448 px + the abstractor, ~385 M parameters) with random weights, exported once by
the converter's own code and kept in WORK_DIR with the variants derived from it. Random weights
are the hard case for quantization (no smooth trained structure); the last column measures the
trained demo model (convert/demo_model, 112 px) the same way.

    python benchmarks/bench_vision.py WORK_DIR [--threads 2] [--rounds 3] [--rederive]

Linux only: the memory a loaded variant holds is read from /proc and glibc is asked to return
freed pages first.

Making a variant and loading one each run in a child process, so their peak and resident memory
are their own. The speed rounds run every variant's session in this process, interleaved (one
image each, round after round), and report the median, so a slower moment of the machine falls
on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from owl2_edge import names, scenes
from owl2_edge.convert.config import PreprocessConfig
from owl2_edge.image import preprocess
from owl2_edge.model_dir import ImageSpec
from owl2_edge.vision import VisionEncoder

DERIVED = ("fp16", "int8", "int4")
VARIANTS = ("fp32", *DERIVED)
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "convert" / "demo_model"

# Child: export the 7B-shaped vision graph with random weights (as tests/test_vision_onnx.py's
# real-size test builds it) and the demo model's, each written under a temporary name first.
_EXPORT = """
import sys
from pathlib import Path
from owl2_edge.convert import hf_layout
from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.config import Owl2Config
from owl2_edge.convert.reference import Owl2Vision
from owl2_edge.convert.tiny import random_tensor
from owl2_edge.convert.vision_onnx import export_vision_onnx
which, out = sys.argv[1], Path(sys.argv[2])
if which == "7b":
    cfg = Owl2Config()
    shapes = hf_layout.expected_shapes(cfg)
    vision = Owl2Vision.from_state_dict(
        cfg, {n: random_tensor(n, shapes[n], 0) for n in Owl2Vision.checkpoint_names(cfg)})
else:
    vision = Owl2Vision.from_checkpoint(Checkpoint.open(which))
part = out.with_name(out.name + ".part")
export_vision_onnx(vision, part)
part.rename(out)
"""

# Child: make one variant; prints its seconds and peak RSS (VmHWM: ru_maxrss would carry over
# the parent's peak from the fork).
_DERIVE = """
import json, sys, time
from owl2_edge.vision_variants import derive_variant
t = time.perf_counter()
derive_variant(sys.argv[1], sys.argv[2], sys.argv[3])
seconds = time.perf_counter() - t
peak_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"derive_s": seconds, "derive_peak_gib": peak_kib / 2**20}))
"""

# Child: open one variant as the runtime does; prints the seconds and the resident memory the
# session holds. The protobuf ONNX Runtime parsed is freed after loading, but glibc keeps the
# pages until asked (malloc_trim): without it the figure wandered by 700 MiB from run to run.
_LOAD = """
import ctypes, json, sys, time
from owl2_edge.vision import VisionEncoder
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
t = time.perf_counter()
encoder = VisionEncoder(sys.argv[1], "cpu", n_threads=int(sys.argv[2]), cache_size=0)
seconds = time.perf_counter() - t
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"load_s": seconds, "load_rss_mib": (rss() - before) / 2**20}))
"""


def _child(code: str, *args) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is a JSON object (or nothing)."""
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"child failed:\n{r.stderr[-3000:]}")
    lines = r.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _files(folder: Path, source: str, rederive: bool) -> dict[str, dict]:
    """folder's fp32 graph (exported from `source` once) and its variants (derived once, or again
    with rederive); the stats of each making, kept in folder/made.json between runs."""
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / names.vision_onnx_file("fp32")
    if not fp32.exists():
        t = time.perf_counter()
        _child(_EXPORT, source, fp32)
        print(f"exported {fp32} in {time.perf_counter() - t:.0f} s", flush=True)
    made_json = folder / "made.json"
    made = json.loads(made_json.read_text()) if made_json.exists() else {}
    for variant in DERIVED:
        path = folder / names.vision_onnx_file(variant)
        if rederive or not path.exists() or variant not in made:
            made[variant] = _child(_DERIVE, fp32, variant, path)
            made_json.write_text(json.dumps(made, indent=1))
    return {v: {"path": folder / names.vision_onnx_file(v), **made.get(v, {})} for v in VARIANTS}


def _pictures(spec: ImageSpec, n: int) -> np.ndarray:
    """n generated scenes (coloured shapes on a plain background) through the runtime's
    preprocessing: real-looking pictures, unlike noise."""
    rng = random.Random(0)
    return np.stack([preprocess(scenes.random_scene(rng, "heldout").draw(spec.size), spec)
                     for _ in range(n)])


def _min_image_cosine(out: np.ndarray, ref: np.ndarray) -> float:
    """The lowest, over the images, of an image's mean cosine over its n_visual embeddings."""
    dot = (out * ref).sum(-1)
    return float((dot / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)).mean(-1).min())


def _cosines(files: dict[str, dict], n_images: int, threads: int) -> dict[str, float]:
    encoders = {v: VisionEncoder(f["path"], "cpu", n_threads=threads, cache_size=0)
                for v, f in files.items()}
    # The release's normalisation (the demo model's too), at the graph's own size.
    p = PreprocessConfig(image_size=encoders["fp32"].image_size)
    spec = ImageSpec(size=p.image_size, mean=p.image_mean, std=p.image_std, pad_color=p.pad_color)
    pixels = _pictures(spec, n_images)
    ref = encoders["fp32"].encode(pixels)
    return {v: _min_image_cosine(e.encode(pixels), ref) for v, e in encoders.items()}


def _speeds(files: dict[str, dict], rounds: int, threads: int) -> dict[str, float]:
    """Seconds per image at batch 1, median over `rounds`, all variants interleaved."""
    encoders = {v: VisionEncoder(f["path"], "cpu", n_threads=threads, cache_size=0)
                for v, f in files.items()}
    s = encoders["fp32"].image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    for encoder in encoders.values():  # warm-up: first-run allocations are not timed
        encoder.encode(pixels)
    seconds: dict[str, list[float]] = {v: [] for v in encoders}
    for _ in range(rounds):
        for variant, encoder in encoders.items():
            t = time.perf_counter()
            encoder.encode(pixels)
            seconds[variant].append(time.perf_counter() - t)
    return {v: float(np.median(x)) for v, x in seconds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=3, help="pictures the cosines are taken on")
    ap.add_argument("--rederive", action="store_true", help="make the variants again")
    args = ap.parse_args()

    big = _files(args.work / "7b", "7b", args.rederive)
    demo = _files(args.work / "demo", str(DEMO_CHECKPOINT), args.rederive)
    for variant, f in big.items():
        f.update(_child(_LOAD, f["path"], args.threads))
        print(f"loaded {variant} in {f['load_s']:.1f} s", flush=True)
    cosine = _cosines(big, args.images, args.threads)
    demo_cosine = _cosines(demo, 12, args.threads)
    speed = _speeds(big, args.rounds, args.threads)

    print(f"\n7B-shaped vision graph (ViT-L/14 @ 448 px + abstractor, random weights); "
          f"{os.cpu_count()} CPUs, {args.threads} threads, batch 1, median of {args.rounds} "
          f"interleaved rounds; cosine: lowest per-image mean over {args.images} scenes "
          f"(7B-shaped) and 12 scenes (trained demo model, 112 px)\n")
    print("| variant | file MiB | make s | make peak GiB | load s | load RSS MiB "
          "| s/image | images/s | cosine 7B-shaped | cosine demo (trained) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, f in big.items():
        made = (f"{f['derive_s']:.0f} | {f['derive_peak_gib']:.1f}" if "derive_s" in f
                else "export | -")
        print(f"| {v} | {f['path'].stat().st_size / 2**20:.0f} | {made} | {f['load_s']:.1f} "
              f"| {f['load_rss_mib']:.0f} | {speed[v]:.2f} | {1 / speed[v]:.3f} "
              f"| {cosine[v]:.6f} | {demo_cosine[v]:.6f} |")


if __name__ == "__main__":
    main()
