"""Time and peak memory of `owl2 convert` on a checkpoint of the real 7B shape.

Model weights cannot be downloaded here, so the checkpoint is generated with random weights in
the release's exact layout (33 bf16 pickle shards, ~16 GB). The conversion runs as a child
process; its peak RSS is the child's ru_maxrss (llama.cpp's quantizer runs inside it).

    python benchmarks/bench_convert.py WORK_DIR [--quant Q4_0] [--vision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--vision", default="fp32")
    args = ap.parse_args()
    hf = args.work / "hf-7b"
    if not (hf / "pytorch_model.bin.index.json").exists():
        t = time.time()
        subprocess.run([sys.executable, "-m", "owl2_edge.convert.tiny", str(hf), "--real-size"], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"generated the 7B-shaped checkpoint in {time.time() - t:.0f} s", flush=True)
    out = args.work / f"owl2-7b-{args.quant}"
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "owl2_edge.cli", "convert", str(hf), "-o", str(out),
                           "--quant", args.quant, "--vision", args.vision, "--force"])
    seconds = time.time() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        sys.exit(proc.returncode)
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    result = {"quant": args.quant, "vision": args.vision, "seconds": round(seconds, 1),
              "peak_rss_gib": round(peak_kib / 2**20, 2), "cpus": os.cpu_count(),
              "files_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
