"""Decoder speed and memory against stock llama.cpp (llama-cpp-python) on the same base GGUF.

Each engine runs in its own process (so peak RSS is its own): a text prefill of --prompt tokens,
then --gen tokens decoded one at a time (greedy on random weights: what matters is the work, not
the words), after the same short warm-up for both. Ours also prefills one image run (n_visual embeddings, the visual route). "ours" is
the default decoder (repacked CPU weights), "ours-mapped" uses every weight in place from the
mapped files (repack=False). Ratios are ours / llama.cpp, same file, same threads, same run.

    python benchmarks/bench_decoder.py MODEL_DIR [--threads 2] [--prompt 128] [--gen 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


WARMUP = 16  # positions run once before timing, by both engines


def rss_gib(field="VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return 0.0


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    # A fixed, varied sequence of ordinary tokens after BOS (ids 3.. skip unk/bos/eos).
    return [1] + [3 + (i * 7919) % (n_vocab - 3) for i in range(n - 1)]


def run_ours(folder: Path, threads: int, n_prompt: int, n_gen: int, repack: bool, device: str) -> dict:
    import numpy as np
    from owl2_edge.decoder import Decoder
    from owl2_edge.model_dir import Manifest
    m = Manifest.load(folder)
    t = time.perf_counter()
    dec = Decoder(folder / m.decoder_file, folder / m.mam_file, n_ctx=n_prompt + n_gen + m.n_visual + 8,
                  n_threads=threads, device=device, repack=repack)
    load = time.perf_counter() - t
    rss_loaded = rss_gib("VmRSS")
    ids = prompt_ids(n_prompt, dec.n_vocab)
    # Warm-up (kernel loading, first allocations), then back to an empty cache.
    dec.eval_tokens(ids[:WARMUP])
    dec.eval_tokens(ids[WARMUP:WARMUP + 1])
    dec.rewind(dec.n_past)
    t = time.perf_counter()
    logits = dec.eval_tokens(ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen):
        logits = dec.eval_tokens([int(np.argmax(logits))])
    decode = time.perf_counter() - t
    embeds = np.random.default_rng(0).standard_normal((m.n_visual, dec.n_embd)).astype(np.float32) * 0.02
    t = time.perf_counter()
    dec.eval_embeddings(embeds)
    image = time.perf_counter() - t
    return {"load_s": load, "prefill_tok_s": n_prompt / prefill, "decode_tok_s": n_gen / decode,
            "image_run_s": image, "image_pos_s": m.n_visual / image, "rss_loaded_gib": rss_loaded,
            "peak_rss_gib": rss_gib(), "device": dec.device}


def run_llama_cpp(folder: Path, threads: int, n_prompt: int, n_gen: int, device: str) -> dict:
    import llama_cpp
    import numpy as np
    from owl2_edge.model_dir import Manifest
    m = Manifest.load(folder)
    t = time.perf_counter()
    llm = llama_cpp.Llama(str(folder / m.decoder_file), n_ctx=n_prompt + n_gen + 8, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False,
                          n_gpu_layers=-1 if device != "cpu" else 0)
    load = time.perf_counter() - t
    rss_loaded = rss_gib("VmRSS")
    ids = prompt_ids(n_prompt, llm.n_vocab())
    llm.eval(ids[:WARMUP])  # the same warm-up as ours
    llm.eval(ids[WARMUP:WARMUP + 1])
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    def last_logits():
        # Only the last position has logits (as in ours); read them from llama.cpp directly.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    for _ in range(n_gen):
        llm.eval([int(np.argmax(last_logits()))])
    decode = time.perf_counter() - t
    return {"load_s": load, "prefill_tok_s": n_prompt / prefill, "decode_tok_s": n_gen / decode,
            "rss_loaded_gib": rss_loaded, "peak_rss_gib": rss_gib()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", choices=["ours", "ours-mapped", "llama.cpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        if args.engine == "llama.cpp":
            r = run_llama_cpp(args.model, args.threads, args.prompt, args.gen, args.device)
        else:
            r = run_ours(args.model, args.threads, args.prompt, args.gen, args.engine == "ours",
                         args.device)
        print(json.dumps(r))
        return
    results = {}
    for engine in ("llama.cpp", "ours", "ours-mapped"):
        out = subprocess.run([sys.executable, __file__, str(args.model), "--threads", str(args.threads),
                              "--prompt", str(args.prompt), "--gen", str(args.gen), "--device", args.device,
                              "--engine", engine], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{engine} failed:\n{out.stderr[-2000:]}")
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        print(engine, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in results[engine].items()}), flush=True)
    base = results["llama.cpp"]
    from owl2_edge.model_dir import Manifest
    m = Manifest.load(args.model)
    files = sum((args.model / f).stat().st_size for f in (m.decoder_file, m.mam_file)) / 2**30
    for engine in ("ours", "ours-mapped"):
        r = results[engine]
        print(f"{engine}: prefill x{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}, "
              f"decode x{r['decode_tok_s'] / base['decode_tok_s']:.2f} of llama.cpp; "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB vs GGUF pair {files:.2f} GiB")


if __name__ == "__main__":
    main()
