"""Clips (issue 40, docs/video.md): three measurements, each its own part.

    python benchmarks/bench_video.py accuracy [--n 100]            # the demo model
    python benchmarks/bench_video.py cost --shape 7b [--rounds 2]  # the 7B shape, random weights
    python benchmarks/bench_video.py hostile [--n 300]             # owl2 serve and mutated clips

accuracy: the demo's held-out clip questions (motion, appear, disappear; 4 frames) asked three
ways: the frames as separate pictures, the clip as an animated GIF file, and as an MP4 file.

cost: `owl2 ask` as a new process, one token, greedy: a 4-frame MP4 clip with an empty disk
cache (cold), the same clip's 4 frames as 4 PNG pictures with an empty cache, and the clip
again in a new process with the first run's cache (a second question about the same clip).
Runs interleaved, --rounds times, every round with its own new clip. Also the frames through
the vision model in one batch against one at a time.

hostile: `owl2 serve` as a subprocess on loopback (the demo model), --n mutated clips
(tests/fuzz_clips.py) sent as video_url parts: statuses counted (a 5xx is a finding), /health
checked after each, and an ordinary clip question answered at the end.

A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from owl2_edge import scenes  # noqa: E402
from owl2_edge.tools.clip_files import write_gif, write_video  # noqa: E402


def accuracy(args) -> None:
    from owl2_edge.model_dir import default_model_path
    from owl2_edge.owl2 import Owl2
    model = args.model or default_model_path()
    examples = [e for e in scenes.clip_examples(args.n, 4, seed=args.seed)
                if e.question.kind != "clip_frames"]
    right: dict[tuple[str, str], int] = {}
    total: dict[str, int] = {}
    with Owl2.load(model) as owl, tempfile.TemporaryDirectory() as tmp:
        for k, ex in enumerate(examples):
            frames = ex.clip.frames(224)
            gif, mp4 = Path(tmp) / f"{k}.gif", Path(tmp) / f"{k}.mp4"
            write_gif(frames, gif)
            write_video(frames, mp4)
            kind = ex.question.kind
            total[kind] = total.get(kind, 0) + 1
            for form, images in (("frames", frames), ("gif", gif), ("mp4", mp4)):
                hit = owl.ask(images, ex.question.text, temperature=0) == ex.question.answer
                right[form, kind] = right.get((form, kind), 0) + hit
    print(f"{model}: {args.n} held-out clips per type, 4 frames, greedy\n")
    print("| question | frames as pictures | GIF file | MP4 file |")
    print("|---|---:|---:|---:|")
    for kind, n in total.items():
        print(f"| {kind} | " + " | ".join(f"{right.get((form, kind), 0) / n:.3f}"
                                          for form in ("frames", "gif", "mp4")) + " |")


def _ask(model: Path, images: list[Path], question: str, cache: Path, threads: int | None):
    argv = [sys.executable, "-m", "owl2_edge.cli", "ask", "-m", str(model), *map(str, images),
            question, "-n", "1", "--temperature", "0", "--ignore-eos", "--json",
            "--cache-dir", str(cache)]
    if threads:
        argv += ["--threads", str(threads)]
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"owl2 ask failed: {done.stderr.strip()}")
    return wall, json.loads(done.stdout)


def cost(args) -> None:
    from owl2_edge.tools.bench.shapes import shape_folder
    model = shape_folder(args.shape, args.quant) if args.shape else args.model
    question = "What happens in the clip?"
    walls: dict[str, list[float]] = {"clip, cold": [], "4 pictures, cold": [],
                                     "clip, second question, new process": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            clip = scenes.random_clip(random.Random(100 + r), "heldout", 4)
            frames = clip.frames(448)
            mp4 = tmp / f"clip-{r}.mp4"
            write_video(frames, mp4)
            # The pictures are the MP4's own decoded frames (the same pixels the clip gives).
            from owl2_edge import clips
            pngs = []
            for i, frame in enumerate(clips.read_frames(clips.Clip(mp4))):
                pngs.append(tmp / f"clip-{r}-{i}.png")
                frame.save(pngs[-1])
            order = ["clip", "pictures"] if r % 2 == 0 else ["pictures", "clip"]
            for what in order:
                if what == "clip":
                    wall, first = _ask(model, [mp4], question, tmp / f"cache-clip-{r}", args.threads)
                    walls["clip, cold"].append(wall)
                    wall, again = _ask(model, [mp4], question, tmp / f"cache-clip-{r}", args.threads)
                    walls["clip, second question, new process"].append(wall)
                    print(f"round {r + 1}: clip cold {walls['clip, cold'][-1]:.2f} s "
                          f"(prompt {first['prompt_tokens']}), again {wall:.2f} s "
                          f"(from disk {again['disk_positions']})", flush=True)
                else:
                    wall, _ = _ask(model, pngs, question, tmp / f"cache-pics-{r}", args.threads)
                    walls["4 pictures, cold"].append(wall)
                    print(f"round {r + 1}: 4 pictures cold {wall:.2f} s", flush=True)
        batch = _vision_batch(model, frames, args.threads)
    print(f"\n{model}, {args.rounds} rounds, threads {args.threads or 'default'}, "
          f"`owl2 ask ... -n 1` wall (process start to exit), median\n")
    print("| run | wall |")
    print("|---|---:|")
    for name, values in walls.items():
        print(f"| {name} | {statistics.median(values):.2f} s |")
    cold = statistics.median(walls["clip, cold"])
    print(f"\nsecond question / cold: "
          f"{statistics.median(walls['clip, second question, new process']) / cold:.3f}; "
          f"clip / 4 pictures: {cold / statistics.median(walls['4 pictures, cold']):.3f}")
    print(f"vision, 4 frames: one batch {batch[4]:.2f} s, one at a time {batch[1]:.2f} s "
          f"({4 / batch[4]:.2f} vs {4 / batch[1]:.2f} frames/s)")


def _vision_batch(model: Path, frames, threads: int | None) -> dict[int, float]:
    """Seconds to encode the frames with the vision model: one run of 4, and 4 runs of 1."""
    from owl2_edge.image import preprocess
    from owl2_edge.model_dir import Manifest
    from owl2_edge.vision import VisionEncoder
    manifest = Manifest.load(model)
    pixels = [preprocess(f.convert("RGB"), manifest.image, "pad") for f in frames]
    out = {}
    for max_batch in (4, 1, 4, 1):
        vision = VisionEncoder.from_folder(model, manifest, device="cpu", n_threads=threads,
                                           cache_size=0, max_batch=max_batch)
        t = time.perf_counter()
        vision.encode_images(pixels)
        took = time.perf_counter() - t
        out[max_batch] = min(out.get(max_batch, took), took)
    return out


def hostile(args) -> None:
    from fuzz_clips import mutate, post_clip, seed_clips
    from owl2_edge.model_dir import default_model_path
    from serve_clients import ServerProcess, free_port, owl2_serve_argv
    model = args.model or default_model_path()
    rng = random.Random(args.seed)
    port = free_port()
    statuses: dict[int, int] = {}
    health_failures = 0
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(owl2_serve_argv(model, port), port, name="owl2-serve") as server:
        seeds = seed_clips(Path(tmp))
        url = f"http://127.0.0.1:{port}"

        def post(data: bytes) -> int:
            return post_clip(url, data, "Which way does the square move?", max_tokens=4)
        t = time.perf_counter()
        for _ in range(args.n):
            data = mutate(rng, rng.choice(list(seeds.values())), list(seeds.values()))[1]
            status = post(data)
            statuses[status] = statuses.get(status, 0) + 1
            try:
                with urllib.request.urlopen(url + "/health", timeout=30) as r:
                    health_failures += r.status != 200
            except OSError:
                health_failures += 1
        took = time.perf_counter() - t
        final = post(seeds[".mp4"])
        alive = server.proc.poll() is None
    print(f"owl2 serve on {model}: {args.n} mutated clips in {took:.0f} s; replies by status "
          f"{dict(sorted(statuses.items()))}; /health failures {health_failures}; the server "
          f"{'still runs' if alive else 'DIED'}; an ordinary clip after them: {final}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=("accuracy", "cost", "hostile"))
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default=None, help="a benchmark shape's folder (7b)")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    {"accuracy": accuracy, "cost": cost, "hostile": hostile}[args.part](args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
