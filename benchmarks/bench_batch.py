"""Images per second of Owl2.batch at several --parallel settings, and of the Ray runner against
the local one, on the same model folder and pictures.

One process loads the model once (n_ctx = the largest parallel x --window) and answers the same
N generated pictures with each setting; settings are interleaved and rotated round by round and
the report takes medians. Every answer is --tokens long (ignore_eos), so settings differ only in
how the work is scheduled, and the answers of every setting are checked equal to parallel 1's.
With --ray, the same job also runs through owl2 batch's Ray runner (a new local Ray instance, one
actor, at the fastest local setting) and its wall time, from starting Ray and loading the model
in the actor to the last row, is set against the local run's (which excludes loading).

    python benchmarks/bench_batch.py -m MODEL_DIR [--images 8] [--tokens 32] [--rounds 2]
        [--parallel 1,2,4,8] [--threads N] [--ray]

A benchmark, not a test: it asserts nothing about time. Default model: the demo model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from owl2_edge import scenes
from owl2_edge.batch.engine import BatchItem
from owl2_edge.model_dir import default_model_path
from owl2_edge.owl2 import Owl2

QUESTION = "Describe the picture."


def pictures(folder: Path, n: int) -> list[Path]:
    paths = []
    for k in range(n):
        path = folder / f"scene{k:03d}.png"
        scenes.random_scene(random.Random(k), "heldout").draw(224).save(path)
        paths.append(path)
    return paths


def run_local(owl: Owl2, items, parallel: int, tokens: int) -> tuple[float, dict]:
    t = time.perf_counter()
    answers = {r.index: r.answer for r in owl.batch(items, parallel=parallel, max_tokens=tokens,
                                                    ignore_eos=True, temperature=0)}
    return time.perf_counter() - t, answers


def run_ray(model: Path, items, parallel: int, tokens: int, threads: int | None,
            n_ctx: int) -> tuple[float, dict]:
    """The same job through `owl2 batch --ray`'s runner on a new local Ray instance, one actor;
    timed from before Ray starts to the last row."""
    import ray

    from owl2_edge.batch.ray_job import ray_rows
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = list(ray_rows(items, {"path": str(model), "n_threads": threads, "n_ctx": n_ctx},
                             {"max_tokens": tokens, "ignore_eos": True, "temperature": 0},
                             parallel, actors=1))
        return time.perf_counter() - t, {r["index"]: r.get("answer") for r in rows}
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", type=Path, default=None)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parallel", default="1,2,4,8")
    p.add_argument("--window", type=int, default=256, help="cache positions per answer")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ray", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = args.model or default_model_path()
    settings = [int(x) for x in args.parallel.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        items = [BatchItem(k, path, QUESTION) for k, path in enumerate(pictures(Path(tmp), args.images))]
        seconds: dict[int, list[float]] = {p: [] for p in settings}
        answers: dict[int, dict] = {}
        with Owl2.load(model, n_threads=args.threads, n_ctx=max(settings) * args.window) as owl:
            list(owl.batch(items[:1], parallel=1, max_tokens=2, temperature=0))  # warm the pages
            for r in range(args.rounds):
                order = settings[r % len(settings):] + settings[:r % len(settings)]
                for parallel in order:
                    s, got = run_local(owl, items, parallel, args.tokens)
                    seconds[parallel].append(s)
                    answers.setdefault(parallel, got)
                    print(f"round {r + 1} parallel {parallel}: {s:.1f} s", file=sys.stderr)
        report = {"model": str(model), "images": args.images, "tokens": args.tokens,
                  "rounds": args.rounds, "settings": {}}
        base = statistics.median(seconds[settings[0]])
        for parallel in settings:
            med = statistics.median(seconds[parallel])
            report["settings"][parallel] = {
                "seconds": round(med, 2), "images_per_s": round(args.images / med, 4),
                "speedup": round(base / med, 2),
                "same_answers": answers[parallel] == answers[settings[0]]}
        if args.ray:
            best = max(settings, key=lambda p: args.images / statistics.median(seconds[p]))
            s, got = run_ray(model, items, best, args.tokens, args.threads, best * args.window)
            local = statistics.median(seconds[best])
            report["ray"] = {"parallel": best, "seconds": round(s, 2),
                             "images_per_s": round(args.images / s, 4),
                             "vs_local": round(local / s, 2), "same_answers": got == answers[best]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['images']} images, {report['tokens']} tokens each, {report['rounds']} rounds "
          f"(medians), {model}")
    print("| --parallel | images/s | seconds | vs parallel 1 | same answers |")
    print("|---|---|---|---|---|")
    for parallel, row in report["settings"].items():
        print(f"| {parallel} | {row['images_per_s']:.3f} | {row['seconds']:.1f} | "
              f"{row['speedup']:.2f}x | {row['same_answers']} |")
    if "ray" in report:
        r = report["ray"]
        print(f"Ray (local instance, 1 actor, parallel {r['parallel']}): {r['images_per_s']:.3f} "
              f"images/s, {r['seconds']:.1f} s, {r['vs_local']:.2f}x the local run; same answers: "
              f"{r['same_answers']}")


if __name__ == "__main__":
    main()
