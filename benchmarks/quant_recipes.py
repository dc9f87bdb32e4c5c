"""Quality per byte on the trained demo model: every stock type (with and without an importance
matrix) against recipes chosen by measurement at the sizes of Q2_K, Q3_K_S, Q3_K_M and Q4_K_M
(docs/quantize.md, "Recipes chosen by measurement"; the plot is docs/quant_recipes.png).

Converts the committed demo checkpoint to F32 (the reference every KL is taken against) and F16
(the source every folder is made from), collects an importance matrix from the 64 built-in
prompts, then for each folder: the decoder pair's bytes, KL against F32 over the answer
positions of held-out questions, and `owl2 eval`'s held-out accuracy per question type. The
recipes are chosen by `owl2 quantize --target-size`'s code on its own calibration questions
(another seed: none of the held-out pictures), without and with the importance matrix, each
with --estimate measured and scaled (and the rank correlation of the two estimates' costs); the
time each choice took is printed.

    python benchmarks/quant_recipes.py WORK_DIR [--eval-per-type 200] [--compare-per-type 50]
                                               [--threads 2] [--plot docs/quant_recipes.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from owl2_edge import quant
from owl2_edge.convert import DEMO_CHECKPOINT
from owl2_edge.convert.converter import convert
from owl2_edge.model_dir import Manifest
from owl2_edge.owl2 import Owl2
from owl2_edge.tools import choose, evaluate, imatrix
from owl2_edge.tools.compare import candidate_pass, reference_pass
from owl2_edge.tools.quantize import quantize_folder

REFERENCE, SOURCE = "F32", "F16"
SIZES_OF = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")


def pair_bytes(folder: Path) -> int:
    m = Manifest.load(folder)
    return (folder / m.decoder_file).stat().st_size + (folder / m.mam_file).stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--eval-per-type", type=int, default=200)
    ap.add_argument("--compare-per-type", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    def load(path):
        return Owl2.load(path, device="cpu", n_threads=args.threads, n_ctx=256)

    for q in (REFERENCE, SOURCE):
        if not (args.work / q / "owl2.json").is_file():
            convert(DEMO_CHECKPOINT, args.work / q, quant=q, vision=("fp32",), force=True)
    with load(args.work / SOURCE) as owl:
        importance = imatrix.collect(owl, imatrix.calibration_prompts(64))
    heldout = evaluate.generated_items(args.eval_per_type, seed=0)
    probe = evaluate.generated_items(args.compare_per_type, seed=1)
    with load(args.work / REFERENCE) as owl:
        refs = reference_pass(owl, probe)

    def measure(folder: Path, row: dict) -> dict:
        with load(folder) as owl:
            kl = candidate_pass(owl, probe, refs).to_dict()
            acc = evaluate.evaluate(owl, heldout).to_dict()
        row.update(bytes=pair_bytes(folder), kl_mean=kl["kl_mean"], kl_p99=kl["kl_p99"],
                   same_answer=kl["same_answer"],
                   accuracy={k: v["accuracy"] for k, v in acc["types"].items()})
        print(json.dumps(row), flush=True)
        return row

    rows = []
    for q in quant.QUANT_TYPES:
        for tag, im in (("plain", None), ("imatrix", importance)):
            if (tag == "plain" and quant.QUANT_TYPES[q].needs_imatrix) or \
                    (tag == "imatrix" and q in (*quant.FLOAT_TYPES, "Q8_0")):
                continue  # needs one / takes none (Q8_0 rounds without weights)
            folder = args.work / (q if tag == "plain" else f"{q}-imatrix")
            if q != REFERENCE and not (folder / "owl2.json").is_file():
                quantize_folder(args.work / SOURCE, folder, q, importance=im, force=True)
            rows.append(measure(folder, {"kind": "stock", "name": q, "imatrix": tag == "imatrix"}))
    stock_bytes = {r["name"]: r["bytes"] for r in rows if not r["imatrix"]}
    for size_of in SIZES_OF:
        for tag, im in (("plain", None), ("imatrix", importance)):
            costs = {}
            for estimate in choose.ESTIMATES:
                folder = args.work / f"recipe-{size_of}-{tag}-{estimate}"
                started = time.perf_counter()
                _, choice = choose.quantize_to_target(
                    args.work / SOURCE, folder, stock_bytes[size_of], load, im, force=True,
                    estimate=estimate)
                seconds = time.perf_counter() - started
                costs[estimate] = {(g.name, t): c for g in choice.groups
                                   for t, c in g.cost.items()}
                rows.append(measure(folder, {
                    "kind": "recipe", "name": f"recipe at {size_of}", "imatrix": im is not None,
                    "estimate": estimate, "target": stock_bytes[size_of], "kept": choice.winner,
                    "calibration_kl": choice.recipe_kl, "predicted_kl": choice.predicted_kl,
                    "choose_seconds": round(seconds, 1),
                    "passes": round(choice.seconds["sensitivity"] / choice.seconds["per_pass"]),
                    "per_pass_seconds": round(choice.seconds["per_pass"], 3),
                    "types": choice.types}))
            keys = list(costs["measured"])
            rows[-1]["rank_correlation"] = rank_correlation(
                [costs["measured"][k] for k in keys], [costs["scaled"][k] for k in keys])
            print(f"{size_of} {tag}: Spearman rank correlation of scaled and measured costs "
                  f"over {len(keys)} (group, type) pairs: {rows[-1]['rank_correlation']:.3f}",
                  flush=True)
    (args.work / "quant_recipes.json").write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)
    if args.plot:
        plot(rows, args.plot)


def rank_correlation(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def print_table(rows: list[dict]) -> None:
    kinds = list(rows[0]["accuracy"])
    print()
    print("| decoder | imatrix | pair MiB | KL mean | KL p99 | same answer | "
          + " | ".join(kinds) + " | chosen in |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|")
    for r in rows:
        accs = " | ".join(f"{r['accuracy'][k]:.3f}" for k in kinds)
        name = r["name"] if r["kind"] == "stock" else f"{r['name']}, {r['estimate']}" + (
            "" if r["kept"] == "recipe" else f" (kept stock {r['kept']})")
        took = f"{r['choose_seconds']:.0f} s" if r["kind"] == "recipe" else ""
        print(f"| {name} | {'yes' if r['imatrix'] else 'no'} | {r['bytes'] / 2**20:.3f} | "
              f"{r['kl_mean']:.1e} | {r['kl_p99']:.1e} | {r['same_answer']:.3f} | {accs} | "
              f"{took} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    styles = {("stock", False): ("o", "tab:blue", "stock type"),
              ("stock", True): ("^", "tab:green", "stock type + imatrix"),
              ("recipe", False): ("*", "tab:red", "recipe chosen by measurement"),
              ("recipe", True): ("P", "tab:purple", "recipe + imatrix")}
    # One marker per recipe row: the measured and scaled choices often pick the same types.
    floor = 1e-9  # F32 against itself is 0; drawn at the floor
    for (kind, im), (marker, colour, label) in styles.items():
        pick = [r for r in rows if r["kind"] == kind and r["imatrix"] == im]
        if not pick:
            continue
        x = [r["bytes"] / 2**20 for r in pick]
        top.scatter(x, [max(r["kl_mean"], floor) for r in pick], marker=marker, color=colour,
                    s=90 if kind == "recipe" else 40, label=label, zorder=3)
        bottom.scatter(x, [min(r["accuracy"].values()) for r in pick], marker=marker,
                       color=colour, s=90 if kind == "recipe" else 40, zorder=3)
        if kind == "stock" and not im:
            for r, xi in zip(pick, x):
                if r["name"] in (*SIZES_OF, "Q8_0", "Q6_K", "Q4_0"):
                    top.annotate(r["name"], (xi, max(r["kl_mean"], floor)), fontsize=8,
                                 xytext=(4, 4), textcoords="offset points")
    for size_of in SIZES_OF:  # the targets
        x = next(r["bytes"] for r in rows if r["name"] == size_of) / 2**20
        for ax in (top, bottom):
            ax.axvline(x, color="grey", ls=":", lw=0.8, zorder=0)
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: r["bytes"]):
        if r["kl_mean"] < best:
            best = r["kl_mean"]
            front.append(r)
    top.step([r["bytes"] / 2**20 for r in front], [max(r["kl_mean"], floor) for r in front],
             where="post", color="grey", alpha=0.5, label="Pareto front", zorder=1)
    top.set_yscale("log")
    top.set_xscale("log")
    top.set_xlim(0.9, 4.8)  # F16/BF16/F32 (8-16 MiB) are off to the right, near zero
    top.set_ylim(1e-8, 1)
    top.set_ylabel("mean KL against F32 (nats), held-out")
    top.legend(fontsize=8)
    top.grid(alpha=0.3, which="both")
    bottom.set_xticks([1, 1.25, 1.5, 2, 2.5, 3, 4])
    bottom.set_xticklabels(["1", "1.25", "1.5", "2", "2.5", "3", "4"])
    bottom.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    bottom.set_ylabel("worst question type's accuracy")
    bottom.set_xlabel("decoder pair (base + sidecar), MiB")
    bottom.set_ylim(0.5, 1.02)
    bottom.axhline(0.95, color="grey", ls="--", lw=0.8)
    bottom.grid(alpha=0.3, which="both")
    fig.suptitle("owl2-edge demo model: quality per byte (dotted: the sizes of Q2_K, Q3_K_S, "
                 "Q3_K_M, Q4_K_M)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
