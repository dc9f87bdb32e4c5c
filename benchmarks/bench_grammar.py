"""The two grammar engines owl2-edge could constrain answers with, on one vocabulary: the cost of
a token mask at each step and of the first one (compiling the schema included).

  llguidance      (PyPI `llguidance`): a JSON schema compiled to its grammar, a bit mask per step
  llama.cpp       (llama-cpp-python's bindings): the schema converted to GBNF by llama-cpp-python's
                  converter, llama.cpp's grammar sampler applied to every token's logit per step

Both walk the same valid answer (the tokens of a JSON object that satisfies the schema, then EOS),
so each step's mask is computed in a realistic state. The vocabulary: the decoder GGUF of the
given model folder (default: the 7B bench shape's, 32000 tokens).

    python benchmarks/bench_grammar.py [-m MODEL_DIR] [--rounds 5]

A benchmark: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# A realistic extraction schema: an object with 5 typed fields, an enum and an array.
SCHEMA = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string"},
        "date": {"type": "string"},
        "total": {"type": "number"},
        "items": {"type": "integer"},
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "lines": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["merchant", "date", "total", "items", "paid", "currency", "lines"],
    "additionalProperties": False,
}
ANSWER = ('{"merchant": "Cafe Central", "date": "2024-01-02", "total": 12.5, "items": 2, '
          '"paid": true, "currency": "EUR", "lines": ["tea", "apple cake"]}')


def llguidance_run(tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    from owl2_edge.constrain import Constraint, ConstraintSpec
    t0 = time.perf_counter()
    spec = ConstraintSpec.response_format({"type": "json_schema", "json_schema": {"schema": SCHEMA}})
    constraint = Constraint.compile(spec, tokenizer)
    state = constraint.start()
    first = None
    steps = []
    logits = np.zeros(tokenizer.n_vocab, dtype=np.float32)
    for token in ids:
        t = time.perf_counter()
        masked = state.mask(logits.copy())
        elapsed = time.perf_counter() - t
        if first is None:
            first = time.perf_counter() - t0
        else:
            steps.append(elapsed)
        if not np.isfinite(masked[token]):
            sys.exit(f"llguidance refused token {token} of the valid answer")
        state.advance(token)
    return first, steps


def llama_cpp_run(tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar
    t0 = time.perf_counter()
    gbnf = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)._grammar
    sampler = llama_cpp.llama_sampler_init_grammar(tokenizer._vocab, gbnf.encode(), b"root")
    if not sampler:
        sys.exit("llama.cpp could not compile the grammar")
    n = tokenizer.n_vocab
    data = (llama_cpp.llama_token_data * n)()
    # The candidates as numpy sees them, so that refilling them each step costs what it would in
    # C (a vectorised copy), not a Python loop.
    view = np.frombuffer(data, dtype=np.dtype([("id", np.int32), ("logit", np.float32),
                                               ("p", np.float32)]))
    ids_row = np.arange(n, dtype=np.int32)
    first, steps = None, []
    try:
        for token in ids:
            t = time.perf_counter()
            view["id"], view["logit"], view["p"] = ids_row, 0.0, 0.0  # fresh, as a chain gets
            array = llama_cpp.llama_token_data_array(data, n, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            allowed = view["logit"][token] != -np.inf
            elapsed = time.perf_counter() - t
            if first is None:
                first = time.perf_counter() - t0
            else:
                steps.append(elapsed)
            if not allowed:
                sys.exit(f"llama.cpp's grammar refused token {token} of the valid answer")
            llama_cpp.llama_sampler_accept(sampler, token)
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return first, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from owl2_edge.model_dir import Manifest
    from owl2_edge.tokenizer import Tokenizer
    if args.model is None:
        from owl2_edge.tools.bench import shapes
        args.model = shapes.shape_folder("7b", "Q4_0")
    manifest = Manifest.load(args.model)
    tokenizer = Tokenizer(args.model / manifest.decoder_file)
    ids = tokenizer.tokenize(ANSWER)
    ids = (ids[1:] if ids and ids[0] == tokenizer.bos_id else ids) + [tokenizer.eos_id]
    results = {"llguidance": [], "llama.cpp grammar": []}
    for _ in range(args.rounds):  # interleaved
        results["llguidance"].append(llguidance_run(tokenizer, ids))
        # llama-cpp-python's JSON grammar has no room for sentencepiece's leading space.
        plain = ids[1:] if tokenizer.token_to_bytes(ids[0]) == b" " else ids
        results["llama.cpp grammar"].append(llama_cpp_run(tokenizer, plain))
    print(f"vocabulary: {args.model / manifest.decoder_file} ({tokenizer.n_vocab} tokens); "
          f"answer: {len(ids)} tokens (EOS included); {args.rounds} rounds, interleaved\n")
    print("| engine | first mask ms (compile included), median | per-token mask ms, median | p95 |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        firsts = [f for f, _ in runs]
        steps = [s for _, ss in runs for s in ss]
        print(f"| {name} | {statistics.median(firsts) * 1e3:.2f} | "
              f"{statistics.median(steps) * 1e3:.3f} | {np.percentile(steps, 95) * 1e3:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
