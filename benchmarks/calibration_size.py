"""How many calibration questions `owl2 quantize --target-size` needs (issue 37, docs/quantize.md,
"How much calibration"): the group costs measured on n questions per type against those on the
largest n (Spearman rank correlation over every measured (group, type)), and whether the recipe
chosen at each target size is the same.

Converts the committed demo checkpoint to F16 (the source), takes the target sizes of stock
types made from it, then for each n measures every group once (the costs are kept in WORK_DIR
between the sizes, tools/kept_costs.py) and chooses at each size; the check questions are the
chooser's own, the same for every n.

    python benchmarks/calibration_size.py WORK_DIR [--per-type 1,2,4,8,16,32] [--sizes Q2_K,Q3_K_M]
                                                   [--estimate measured] [--threads 2]

A benchmark: it asserts nothing. The costs depend on the model: on the demo model they say how
the ranking settles on a model whose answers are a few tokens long.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from owl2_edge.convert import DEMO_CHECKPOINT
from owl2_edge.convert.converter import convert
from owl2_edge.model_dir import Manifest
from owl2_edge.owl2 import Owl2
from owl2_edge.tools import choose, evaluate, kept_costs
from owl2_edge.tools.quantize import quantize_folder


def ranks(values) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(values)))


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--per-type", default="1,2,4,8,16,32")
    parser.add_argument("--sizes", default="Q2_K,Q3_K_M")
    parser.add_argument("--estimate", default="measured", choices=choose.ESTIMATES)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    counts = sorted(int(x) for x in args.per_type.split(","))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    os.environ[kept_costs.FOLDER_ENV] = str(work / "kept")
    source = work / "F16"
    if not source.exists():
        convert(DEMO_CHECKPOINT, source, "F16", ("fp32",), force=False)
    manifest = Manifest.load(source)
    targets = {}
    for name in args.sizes.split(","):
        folder = work / f"stock-{name}"
        if not folder.exists():
            quantize_folder(source, folder, name)
        m = Manifest.load(folder)
        targets[name] = choose.pair_bytes([folder / m.decoder_file, folder / m.mam_file])
    _, check_items = choose.generated_sets()

    rows = {}
    with Owl2.load(source, device="cpu", n_ctx=512, n_threads=args.threads) as owl:
        for n in counts:
            items = evaluate.generated_items(n, choose.CALIBRATION_SEED)
            for size, target in targets.items():
                t0 = time.perf_counter()
                choice = choose.choose(source, manifest, target, owl, items=items,
                                       estimate=args.estimate, check_items=check_items)
                rows[(n, size)] = (choice, time.perf_counter() - t0)
    full = max(counts)
    print(f"demo model F16 source, --estimate {args.estimate}, {args.threads} threads; "
          f"Spearman and recipes against {full} questions per type")
    print("| questions per type | questions | answer positions | Spearman of the costs | "
          + " | ".join(f"{s}: same recipe, winner" for s in targets) + " | measuring time |")
    print("|---:|---:|---:|---:|" + "---|" * len(targets) + "---:|")
    for n in counts:
        first, seconds = rows[(n, next(iter(targets)))]
        ref = rows[(full, next(iter(targets)))][0]
        pairs = [(g.name, t) for g in ref.groups for t in g.cost]
        mine = {g.name: g.cost for g in first.groups}
        theirs = {g.name: g.cost for g in ref.groups}
        rho = spearman([mine[g][t] for g, t in pairs], [theirs[g][t] for g, t in pairs])
        cells = []
        for size in targets:
            choice = rows[(n, size)][0]
            same = choice.types == rows[(full, size)][0].types
            cells.append(f"{'yes' if same else 'no'}, {choice.winner}")
        print(f"| {n} | {first.questions} | {first.positions} | {rho:.3f} | "
              + " | ".join(cells) + f" | {first.seconds.get('sensitivity', 0):.0f} s |")


if __name__ == "__main__":
    main()
