"""What each decoder type costs in quality, on the trained demo model (README, "Quantization").

Converts the committed demo checkpoint to every type, then for each: the decoder pair's size,
`owl2 compare` against F32 (KL, top-1 agreement, same greedy answer) and `owl2 eval`'s held-out
accuracy per question type. Prints a Markdown table.

    python benchmarks/quant_quality.py WORK_DIR [--types F16 Q8_0 Q4_K_M] [--eval-per-type 200]
                                                [--compare-per-type 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from owl2_edge import evaluate
from owl2_edge.compare import compare
from owl2_edge.convert import DEMO_CHECKPOINT
from owl2_edge.convert.converter import convert
from owl2_edge.convert.gguf_pair import QUANT_TYPES
from owl2_edge.model_dir import Manifest
from owl2_edge.owl2 import Owl2

REFERENCE = "F32"


def decoder_mib(folder: Path) -> float:
    m = Manifest.load(folder)
    return ((folder / m.decoder_file).stat().st_size + (folder / m.mam_file).stat().st_size) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--types", nargs="*", default=[q for q in QUANT_TYPES if q != REFERENCE])
    ap.add_argument("--eval-per-type", type=int, default=200)
    ap.add_argument("--compare-per-type", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    def load(path):
        return Owl2.load(path, device="cpu", n_threads=args.threads, n_ctx=256)

    folders = {}
    for quant in [REFERENCE, *args.types]:
        folders[quant] = args.work / quant
        if not (folders[quant] / "owl2.json").is_file():
            convert(DEMO_CHECKPOINT, folders[quant], quant=quant, vision=("fp32",), force=True)
    heldout = evaluate.generated_items(args.eval_per_type, seed=0)
    probe = evaluate.generated_items(args.compare_per_type, seed=1)
    rows = []
    for quant, folder in folders.items():
        with load(folder) as owl:
            acc = evaluate.evaluate(owl, heldout)
        kl = compare(folders[REFERENCE], folder, probe, load).to_dict()
        row = {"type": quant, "decoder_mib": round(decoder_mib(folder), 2), **kl,
               "accuracy": acc.to_dict()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    kinds = list(rows[0]["accuracy"]["types"])
    print()
    print("| type | decoder + sidecar MiB | KL mean | KL p99 | top-1 | same answer | "
          + " | ".join(kinds) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(kinds))
    for r in rows:
        accs = " | ".join(f"{r['accuracy']['types'][k]['accuracy']:.3f}" for k in kinds)
        print(f"| {r['type']} | {r['decoder_mib']:.2f} | {r['kl_mean']:.1e} | {r['kl_p99']:.1e} | "
              f"{r['top1_agreement']:.3f} | {r['same_answer']:.3f} | {accs} |")


if __name__ == "__main__":
    main()
