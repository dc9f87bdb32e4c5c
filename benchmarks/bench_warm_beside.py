"""What a warm costs the answers running beside it (issue 38): two streamed answers, alone and
with pictures read ahead (POST /v1/warm, each a new picture) sent while they stream; their gaps
between tokens compared. A warm waits while any answer runs (its picture too is encoded only
then), so the two should be the same.

    python benchmarks/bench_warm_beside.py [-m MODEL_DIR | --shape 8x2048] [--rounds 4]
                                            [--tokens 64] [--warms 2]

Phases alternate (alone, with warms) --rounds times on one `owl2 serve --parallel 4` process.
Reported: p50 and p95 of the inter-token gaps of each phase, and with/alone. A benchmark, not a
test: it asserts nothing about time. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_clients import (HOST, ServerProcess, free_port, machine,  # noqa: E402
                           owl2_serve_argv, percentile, post, scene_pictures)


def streams(port: int, tokens: int, warm_urls: list[str]) -> list[float]:
    """Two streamed answers at once (and the warms, sent once both stream); their gaps."""
    results = [None, None]

    def one(k: int) -> None:
        results[k] = post(port, "/v1/completions", {
            "prompt": f"USER: Tell a long story number {k}. ASSISTANT:", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}, timeout_s=600)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both are decoding
    for url in warm_urls:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            conn.request("POST", "/v1/warm", json.dumps({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]}),
                {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise SystemExit(f"/v1/warm: {response.status} {response.read()[:300]!r}")
            response.read()
        finally:
            conn.close()
    for t in threads:
        t.join()
    if any(r.kind != "ok" for r in results):
        raise SystemExit(f"an answer failed: {[(r.kind, r.error) for r in results]}")
    return [gap for r in results for gap in r.gaps_s]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default=None, help="a benchmark shape (8x2048, 7b) instead")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warms", type=int, default=2, help="warms sent during each phase")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.shape:
        from owl2_edge.tools.bench.shapes import shape_folder
        model = shape_folder(args.shape, args.quant)
    else:
        from owl2_edge.model_dir import default_model_path
        model = args.model or default_model_path()
    port = free_port()
    pictures = [url for url, _ in scene_pictures(args.rounds * args.warms, seed=7)]
    gaps: dict[str, list[float]] = {"alone": [], "with warms": []}
    with ServerProcess(owl2_serve_argv(model, port, threads=args.threads, parallel=4,
                                       ctx=4096), port):
        streams(port, 8, [])  # warm-up
        for round_no in range(args.rounds):
            new = pictures[round_no * args.warms:(round_no + 1) * args.warms]
            order = ("alone", "with warms") if round_no % 2 == 0 else ("with warms", "alone")
            for phase in order:
                gaps[phase] += streams(port, args.tokens, new if phase == "with warms" else [])
    print(f"# bench_warm_beside: {model}, {machine()['cpu']} ({machine()['nproc']} cores), "
          f"{args.rounds} rounds, 2 streams of {args.tokens} tokens, {args.warms} warms a phase")
    print("| phase | ITL p50 ms | ITL p95 ms |")
    print("|---|---:|---:|")
    for phase, values in gaps.items():
        print(f"| {phase} | {percentile(values, 0.5) * 1e3:.2f} | "
              f"{percentile(values, 0.95) * 1e3:.2f} |")
    ratio = percentile(gaps["with warms"], 0.95) / percentile(gaps["alone"], 0.95)
    print(f"\np95 with warms / alone: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
