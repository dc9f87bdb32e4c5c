"""Time to first token: a first question about an image, then a second question about it.

The second question finds the image's embeddings in the cache and the shared prompt prefix
("USER: " + the image's positions) in the KV cache, so it only evaluates its own new tokens.

    python benchmarks/bench_ttft.py MODEL_DIR [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from owl2_edge.owl2 import Owl2
from owl2_edge.demo_image import sample_image


def first_token_seconds(owl: Owl2, image, question: str) -> float:
    t = time.perf_counter()
    pieces = owl.stream(image, question, temperature=0, max_tokens=1)
    next(iter(pieces), None)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    owl = Owl2.load(args.model, device=args.device, n_threads=args.threads)
    image = sample_image()
    for label, question in (("first question", "What shape is on the left?"),
                            ("second question, same image", "How many shapes are there?")):
        seconds = first_token_seconds(owl, image, question)
        s = owl.stats
        print(f"{label}: first token after {seconds:.2f} s (vision {s.timings['vision']:.2f} s, "
              f"{s.images_encoded} image(s) encoded; {s.evaluated_positions} of {s.prompt_positions} "
              f"prompt positions evaluated, {s.reused_positions} reused)")


if __name__ == "__main__":
    main()
