"""Decode speed with a realistic JSON schema against free decoding, on one model, interleaved.

Each round asks the same picture question twice: free (ignore_eos, --tokens tokens) and
constrained by the schema of benchmarks/bench_grammar.py (an object with 5 typed fields, an enum
and an array; --tokens at most). Reports decode tokens/s of each (stats: decode time over the
tokens decided), their ratio, and the first-token time of each: the constrained one includes
compiling the schema (kept compiled after the first request, as a server does; the first round's
compile is shown on its own).

    python benchmarks/bench_structured.py [--shape 7b] [-m MODEL_DIR] [--rounds 3] [--tokens 64]

A benchmark: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_grammar import SCHEMA  # noqa: E402  (the one realistic schema of the benchmarks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from owl2_edge import Owl2, scenes
    from owl2_edge.constrain import Constraint, ConstraintSpec
    model = args.model
    if model is None:
        from owl2_edge.tools.bench import shapes
        model = shapes.shape_folder(args.shape, args.quant)
    picture = scenes.random_scene(random.Random(1), "heldout").draw(448)
    question = "Read the receipt in the picture into JSON."
    response_format = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA}}
    rows = {"free": [], "schema": []}
    with Owl2.load(model, n_threads=args.threads) as owl:
        t = time.perf_counter()
        Constraint.compile(ConstraintSpec.response_format(response_format), owl.tokenizer)
        compile_s = time.perf_counter() - t  # the vocabulary's first grammar view included
        owl.ask(picture, question, temperature=0, max_tokens=2)  # the picture's cells: warm
        for r in range(args.rounds):
            for kind in ("free", "schema"):
                kwargs = ({"ignore_eos": True} if kind == "free"
                          else {"response_format": response_format})
                owl.ask(picture, question, temperature=0, max_tokens=args.tokens, **kwargs)
                s = owl.stats
                rates = s.rates()
                rows[kind].append({"decode_tok_s": rates["decode_tok_per_s"],
                                   "first_token_s": rates["first_token_s"],
                                   "tokens": s.generated_tokens, "finish": s.finish_reason})
                print(f"round {r + 1} {kind}: {rates['decode_tok_per_s']:.2f} tok/s, "
                      f"{s.generated_tokens} tokens ({s.finish_reason}), first token "
                      f"{rates['first_token_s']:.3f} s", file=sys.stderr)
    med = {k: {f: statistics.median(row[f] for row in v) for f in ("decode_tok_s", "first_token_s")}
           for k, v in rows.items()}
    print(f"model {model}, {args.rounds} rounds, up to {args.tokens} tokens, greedy; the "
          f"schema's first compile: {compile_s * 1e3:.1f} ms\n")
    print("| decoding | decode tok/s | first token s | tokens |")
    print("|---|---:|---:|---:|")
    for kind, v in rows.items():
        print(f"| {kind} | {med[kind]['decode_tok_s']:.2f} | {med[kind]['first_token_s']:.3f} | "
              f"{statistics.median(row['tokens'] for row in v):.0f} |")
    print(f"\nconstrained / free decode speed: "
          f"{med['schema']['decode_tok_s'] / med['free']['decode_tok_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
