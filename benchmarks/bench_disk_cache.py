"""A second `owl2 ask` process about the same picture, with and without the disk cache.

What a desktop user does: ask about a photo, read the answer, ask something else in a new
process. Each round, in a fresh cache folder:

  1. `owl2 ask PHOTO Q1`           (first process: loads, encodes the picture, prefills, keeps)
  2. `owl2 ask PHOTO Q2`           (second process: starts from the kept picture prefix)
  3. `owl2 ask PHOTO Q2 --no-cache` (the same without the cache: what a second process cost)

and reports each process's wall time (process start to exit, as the user waits), the ratio
second / first, that answers 2 and 3 are the same bytes, and the entries' sizes.

    python benchmarks/bench_disk_cache.py --shape vitl-8x2048 [--rounds 3] [--tokens 8]
    python benchmarks/bench_disk_cache.py --shape 7b
    python benchmarks/bench_disk_cache.py -m MODEL_DIR

Shapes (random weights, built once into the bench cache): "vitl-8x2048" is the release's vision
tower (ViT-L/14 at 448 px) and abstractor with an 8-layer 2048-wide decoder; "7b" the release's
shape. The decoder is Q4_0, the vision file int8 (the CPU's pick). A benchmark: it asserts
nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from owl2_edge import scenes

QUESTIONS = ("What is in the picture?", "Which colours does it have?")


def vitl_8x2048_folder(quant: str) -> Path:
    """The release's vision tower and abstractor, an 8-layer 2048-wide LLaMA decoder (heads of
    128, FFN 5632, vocabulary 32000); built once into <bench cache>/vitl-8x2048-<quant>/model."""
    import dataclasses

    from owl2_edge import names
    from owl2_edge.convert import tiny
    from owl2_edge.convert.config import Owl2Config, PreprocessConfig, TextConfig
    from owl2_edge.convert.converter import convert
    from owl2_edge.model_dir import staged_folder
    from owl2_edge.tools.bench import shapes
    base = Owl2Config()
    text = dataclasses.replace(TextConfig(), vocab_size=32000, hidden_size=2048,
                               intermediate_size=5632, num_layers=8, num_heads=16, num_kv_heads=16)
    config = Owl2Config(text=text, vision=base.vision, abstractor=base.abstractor,
                        preprocess=PreprocessConfig(image_size=base.vision.image_size))
    described = {"config": config.to_config_dict(), "preprocessor": config.to_preprocessor_dict()}
    entry = shapes.cache_root() / f"vitl-8x2048-{quant}"
    model, shape_file = entry / "model", entry / "shape.json"
    if (model / names.MANIFEST_FILE).is_file() and shape_file.is_file() \
            and json.loads(shape_file.read_text()) == described:
        return model
    print(f"building vitl-8x2048 {quant} into {entry} (minutes) ...", file=sys.stderr)
    with staged_folder(entry) as work:
        tiny.make_tiny_checkpoint(work / "checkpoint", config=config, seed=0)
        convert(work / "checkpoint", work / "model", quant=quant, vision=("int8",))
        shutil.rmtree(work / "checkpoint")
        (work / "shape.json").write_text(json.dumps(described, indent=1) + "\n")
    return model


def model_folder(args) -> Path:
    if args.model is not None:
        return args.model
    if args.shape == "vitl-8x2048":
        return vitl_8x2048_folder(args.quant)
    from owl2_edge.tools.bench import shapes
    return shapes.shape_folder(args.shape, args.quant)


def ask(model: Path, photo: Path, question: str, args, cache: Path | None) -> tuple[float, dict]:
    argv = [sys.executable, "-m", "owl2_edge.cli", "ask", "-m", str(model), str(photo), question,
            "--temperature", "0", "-n", str(args.tokens), "--ignore-eos", "--json",
            "--threads", str(args.threads)]
    argv += ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
    t0 = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        sys.exit(f"owl2 ask failed: {run.stderr.strip()}")
    return wall, json.loads(run.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default="vitl-8x2048", help="vitl-8x2048, 7b or 1b")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8, help="tokens of each answer (ignore_eos)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = model_folder(args)
    work = Path(tempfile.mkdtemp(prefix="owl2-bench-cache-"))
    photo = work / "photo.png"
    scenes.random_scene(random.Random(3), "heldout").draw(640).save(photo)
    rows, same = [], []
    try:
        for r in range(args.rounds):
            cache = work / f"cache-{r}"
            first, _ = ask(model, photo, QUESTIONS[0], args, cache)
            second, cached = ask(model, photo, QUESTIONS[1], args, cache)
            plain, uncached = ask(model, photo, QUESTIONS[1], args, None)
            same.append(cached["token_ids"] == uncached["token_ids"]
                        and cached["text"] == uncached["text"])
            info = json.loads(subprocess.run(
                [sys.executable, "-m", "owl2_edge.cli", "cache", "info", "--cache-dir",
                 str(cache), "--json"], capture_output=True, text=True, check=True).stdout)
            rows.append({"first_s": first, "second_s": second, "second_no_cache_s": plain,
                         "disk_positions": cached["disk_positions"],
                         "prompt_positions": cached["prompt_tokens"],
                         "kinds": {k: v["bytes"] for k, v in info["kinds"].items()},
                         "entries": {k: v["entries"] for k, v in info["kinds"].items()}})
            print(f"round {r + 1}: first {first:.2f} s, second {second:.2f} s "
                  f"({second / first:.2f}x), second without the cache {plain:.2f} s, "
                  f"same answer: {same[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(row[k] for row in rows)
           for k in ("first_s", "second_s", "second_no_cache_s")}
    last = rows[-1]
    summary = {"model": str(model), "shape": args.shape if args.model is None else None,
               "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
               "median": med, "second_over_first": med["second_s"] / med["first_s"],
               "answers_equal": f"{sum(same)}/{len(same)}", "entry_bytes": last["kinds"],
               "entries": last["entries"], "disk_positions": last["disk_positions"],
               "prompt_positions": last["prompt_positions"], "rounds_detail": rows}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"model {model}, {args.tokens} tokens an answer, {args.threads} threads, "
          f"{args.rounds} rounds (medians)\n")
    print("| first process s | second process s | second ÷ first | second without cache s "
          "| answers equal | prompt positions from disk | entry bytes (embeds / kv) |")
    print("|---:|---:|---:|---:|---|---:|---|")
    print(f"| {med['first_s']:.2f} | {med['second_s']:.2f} | "
          f"{summary['second_over_first']:.2f} | {med['second_no_cache_s']:.2f} | "
          f"{summary['answers_equal']} | {last['disk_positions']} of "
          f"{last['prompt_positions']} | {last['kinds']['embeds']:,} / {last['kinds']['kv']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
