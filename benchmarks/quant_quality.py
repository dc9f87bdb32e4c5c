"""What each decoder type costs in quality, on the trained demo model (docs/quantize.md, "Every
type" and "The demo model's quality by type").

Converts the committed demo checkpoint to F32 (the reference) and F16 (the source), quantizes
the F16 folder to every type with `owl2 quantize`'s code, and for each: the decoder pair's size,
`owl2 compare` against F32 (KL, top-1 agreement, same greedy answer), the same again for the
folder quantized with an importance matrix from the built-in calibration prompts, and `owl2
eval`'s held-out accuracy per question type. Prints a Markdown table.

    python benchmarks/quant_quality.py WORK_DIR [--types Q8_0 Q4_K_M] [--eval-per-type 200]
                                                [--compare-per-type 50] [--imatrix-prompts 64]
                                                [--threads 2]

--eval-per-type 0 skips the accuracies, --imatrix-prompts 0 the importance matrix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from owl2_edge import quant
from owl2_edge.tools import evaluate, imatrix
from owl2_edge.tools.compare import candidate_pass, reference_pass
from owl2_edge.convert import DEMO_CHECKPOINT
from owl2_edge.convert.converter import convert
from owl2_edge.model_dir import Manifest
from owl2_edge.owl2 import Owl2
from owl2_edge.tools.quantize import quantize_folder

REFERENCE, SOURCE = "F32", "F16"


def decoder_mib(folder: Path) -> float:
    m = Manifest.load(folder)
    return ((folder / m.decoder_file).stat().st_size + (folder / m.mam_file).stat().st_size) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--types", nargs="*", default=[q for q in quant.QUANT_TYPES if q != REFERENCE])
    ap.add_argument("--eval-per-type", type=int, default=200)
    ap.add_argument("--compare-per-type", type=int, default=50)
    ap.add_argument("--imatrix-prompts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    def load(path):
        return Owl2.load(path, device="cpu", n_threads=args.threads, n_ctx=256)

    for q in (REFERENCE, SOURCE):
        if not (args.work / q / "owl2.json").is_file():
            convert(DEMO_CHECKPOINT, args.work / q, quant=q, vision=("fp32",), force=True)
    importance = None
    if args.imatrix_prompts:
        with load(args.work / SOURCE) as owl:
            importance = imatrix.collect(owl, imatrix.calibration_prompts(args.imatrix_prompts))
    heldout = evaluate.generated_items(args.eval_per_type, seed=0) if args.eval_per_type else []
    probe = evaluate.generated_items(args.compare_per_type, seed=1)
    with load(args.work / REFERENCE) as owl:  # the reference's answers, once for every type
        refs = reference_pass(owl, probe)
    rows = []
    for q in [REFERENCE, *args.types]:
        row = {"type": q}
        variants = [("plain", None)] if not quant.QUANT_TYPES[q].needs_imatrix else []
        if importance is not None and q not in quant.FLOAT_TYPES:
            variants.append(("imatrix", importance))
        for tag, im in variants:
            folder = args.work / (q if tag == "plain" else f"{q}-imatrix")
            if q != REFERENCE and not (folder / "owl2.json").is_file():
                quantize_folder(args.work / SOURCE, folder, q, importance=im, force=True)
            row["decoder_mib"] = round(decoder_mib(folder), 2)
            with load(folder) as owl:
                kl = candidate_pass(owl, probe, refs).to_dict()
            row[tag] = {k: kl[k] for k in ("kl_mean", "kl_p99", "top1_agreement", "same_answer")}
            if tag == "plain" and heldout:
                with load(folder) as owl:
                    row["accuracy"] = evaluate.evaluate(owl, heldout).to_dict()
        rows.append(row)
        print(json.dumps(row), flush=True)
    kinds = list(rows[0]["accuracy"]["types"]) if heldout else []
    print()
    print("| type | decoder + sidecar MiB | KL mean | KL p99 | top-1 | same answer | "
          "KL mean, imatrix | same answer, imatrix | " + " | ".join(kinds) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(kinds))

    def cell(r, tag, key, fmt):
        return format(r[tag][key], fmt) if tag in r else "—"
    for r in rows:
        accs = " | ".join(f"{r['accuracy']['types'][k]['accuracy']:.3f}" if "accuracy" in r
                          else "—" for k in kinds)
        print(f"| {r['type']} | {r['decoder_mib']:.2f} | {cell(r, 'plain', 'kl_mean', '.1e')} | "
              f"{cell(r, 'plain', 'kl_p99', '.1e')} | {cell(r, 'plain', 'top1_agreement', '.3f')} | "
              f"{cell(r, 'plain', 'same_answer', '.3f')} | {cell(r, 'imatrix', 'kl_mean', '.1e')} | "
              f"{cell(r, 'imatrix', 'same_answer', '.3f')} | {accs}".rstrip(" |") + " |")


if __name__ == "__main__":
    main()
