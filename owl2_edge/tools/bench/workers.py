"""One measurement per process, so that its peak memory is its own:

    python -m owl2_edge.tools.bench.workers KIND MODEL_DIR --threads N [--device cpu|cuda] [--variant V]

prints one JSON line (its last line of stdout). KIND is one of WORKERS:
- decoder-ours, decoder-llama.cpp: the decoder alone, ours (MAM, the pair) and stock llama.cpp
  (the base file), the same script: load; a text prefill of TEXT_PREFILL tokens; DECODE tokens
  decoded greedily; an image prefill (ours: an image's n_visual embeddings, then IMAGE_TEXT text
  tokens; llama.cpp, which cannot take the image: as many text positions), each after the same
  warm-up and an emptied cache;
- vision: one vision file of the folder (--variant) in ONNX Runtime: session load, one image;
- vision-torch: the converter's PyTorch reference vision of the folder's shape (random weights),
  one image, for a folder that `owl2 bench --shape` built;
- ask-api: `Owl2.load`, then a first question about a new image and a second one about the same
  image, each timed to its first token;
- stock: the hand-stitched stock pipeline (bench/stock.py).

Every worker adds its peak RSS (VmHWM: the kernel's high-water mark of this process alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from owl2_edge import names
from owl2_edge.errors import Owl2Error
from owl2_edge.load_options import LoadOptions
from owl2_edge.model_dir import Manifest

# What is measured (the sizes issue 13 asks for).
WARMUP = 16            # positions both engines run, then one more, before any timing
TEXT_PREFILL = 128     # tokens of the text prefill
DECODE = 32            # tokens decoded one at a time
IMAGE_TEXT = 40        # text tokens after the image in the image prefill
# The questions about the sample picture: the first a 15-word one, the second a short one.
QUESTION = "What is in this picture, and what colour is each of the shapes you see?"
SECOND_QUESTION = "How many shapes are there?"
# The context of everything that answers questions (`owl2 ask`'s default, named here so that
# the stock pipeline gets the same cache).
ASK_N_CTX = LoadOptions.n_ctx
# Where a benchmark runs: never "auto", so that a row says what it ran on.
DEVICES = tuple(d for d in names.DEVICES if d != "auto")
# llama.cpp's batch and micro-batch, as ours (n_ubatch 512).
N_BATCH = 512
# Bytes per element of the f16 KV cache both engines use by default.
KV_F16_BYTES = 2


# --- What every worker reports ---------------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not the parent's ru_maxrss: after a fork
    that carries the parent's own peak over."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def kv_cache_bytes(manifest: Manifest, n_ctx: int) -> int:
    """K and V of every layer for n_ctx positions in f16. The model has as many K/V heads as
    heads (LLaMA-2-7B's attention), so a position's K is n_embd wide."""
    return 2 * manifest.decoder.n_layer * n_ctx * manifest.decoder.n_embd * KV_F16_BYTES


def file_bytes(folder: Path, *files: str) -> int:
    """The files' sizes, a vision ONNX's data file included (owl2_edge/onnx_weights.py)."""
    paths = [folder / f for f in files]
    paths += [p.parent / names.vision_data_file(p.name) for p in paths if p.suffix == ".onnx"]
    return sum(p.stat().st_size for p in paths if p.is_file())


def prompt_ids(n: int, manifest: Manifest) -> list[int]:
    """BOS and a fixed, varied run of ordinary tokens (ids from 3: past unk, bos, eos)."""
    n_vocab = manifest.decoder.n_vocab
    return [manifest.decoder.bos_id] + [3 + (i * 7919) % (n_vocab - 3) for i in range(n - 1)]


def timed(run: Callable, *args, **kwargs):
    """(seconds, result) of run(*args, **kwargs)."""
    t = time.perf_counter()
    result = run(*args, **kwargs)
    return time.perf_counter() - t, result


# --- The decoder: ours and stock llama.cpp, one script ---------------------------------------

def decoder_rates(manifest: Manifest, run_text: Callable, forget: Callable,
                  run_image: Callable) -> dict:
    """The same measurements of either engine. run_text(ids) evaluates a text run and returns
    its last logits; forget() empties the cache; run_image() evaluates the image prefill."""
    ids = prompt_ids(TEXT_PREFILL, manifest)
    # Warm-up (kernels' first use, first allocations), then back to an empty cache.
    run_text(ids[:WARMUP])
    run_text(ids[WARMUP:WARMUP + 1])
    forget()
    prefill_s, logits = timed(run_text, ids)

    def decode():
        last = logits
        for _ in range(DECODE):
            # Greedy on random weights: what matters is the work, not the words.
            last = run_text([int(np.argmax(last))])
    decode_s, _ = timed(decode)
    forget()
    image_s, _ = timed(run_image)
    return {"text_prefill_tok_s": TEXT_PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s,
            "image_prefill_positions": manifest.n_visual + IMAGE_TEXT,
            "image_prefill_pos_s": (manifest.n_visual + IMAGE_TEXT) / image_s}


def decoder_ctx(manifest: Manifest) -> int:
    """A cache that holds the longest run of the script (both engines get this one)."""
    return max(TEXT_PREFILL + DECODE, manifest.n_visual + IMAGE_TEXT) + 8


def decoder_ours(folder: Path, threads: int, device: str, **_) -> dict:
    from owl2_edge.decoder import Decoder
    m = Manifest.load(folder)
    n_ctx = decoder_ctx(m)
    load_s, dec = timed(Decoder, folder / m.decoder_file, folder / m.mam_file, n_ctx=n_ctx,
                        n_threads=threads, device=device)
    embeds = (np.random.default_rng(0).standard_normal((m.n_visual, m.decoder.n_embd))
              * 0.02).astype(np.float32)
    question = prompt_ids(IMAGE_TEXT + 1, m)[1:]

    def run_image():  # one pass, as the runtime prefills a prompt (Decoder.eval_runs)
        return dec.eval_runs([embeds, question])
    rates = decoder_rates(m, dec.eval_tokens, lambda: dec.rewind(dec.n_past), run_image)
    return {"load_s": load_s, **rates, "device": dec.device,
            "files_bytes": file_bytes(folder, m.decoder_file, m.mam_file),
            "kv_bytes": kv_cache_bytes(m, n_ctx)}


def check_llama_cpp_device(device: str) -> bool:
    """Whether llama.cpp runs on the GPU; an error when one was asked for and this llama.cpp has
    none (it would quietly run on the CPU, and the row would compare unlike with unlike)."""
    import llama_cpp
    if device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
        raise Owl2Error("device 'cuda' asked for, but this llama-cpp-python has no GPU offload "
                        "(it was built without CUDA)")
    return device == "cuda"


def decoder_llama_cpp(folder: Path, threads: int, device: str, **_) -> dict:
    import llama_cpp

    from owl2_edge.tools import llama_stock
    m = Manifest.load(folder)
    n_ctx = decoder_ctx(m)
    on_gpu = check_llama_cpp_device(device)
    # flash_attn as ours: off on the CPU by default, always on a GPU.
    load_s, llm = timed(lambda: llama_stock.Llama(
        str(folder / m.decoder_file), n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH,
        n_threads=threads, n_threads_batch=threads, n_gpu_layers=-1 if on_gpu else 0,
        flash_attn=on_gpu, verbose=False))

    def run_text(ids):
        llm.eval(ids)
        # Only the last position has logits (as in ours); read them from llama.cpp directly.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                     shape=(llm.n_vocab(),))
    # llama.cpp cannot take the image: the same number of positions, as text.
    same_positions = prompt_ids(m.n_visual + IMAGE_TEXT, m)
    rates = decoder_rates(m, run_text, llm.reset, lambda: run_text(same_positions))
    return {"load_s": load_s, **rates, "device": device.upper(),
            "files_bytes": file_bytes(folder, m.decoder_file), "kv_bytes": kv_cache_bytes(m, n_ctx)}


# --- Vision ------------------------------------------------------------------------------------

def sample_pixels(manifest: Manifest) -> np.ndarray:
    """The built-in sample picture as the vision model takes it: float32 [1, 3, S, S]."""
    from owl2_edge.tools.demo_image import sample_image
    from owl2_edge.image import preprocess
    return preprocess(sample_image(), manifest.image)[None]


def vision_onnx(folder: Path, threads: int, device: str, variant: str, **_) -> dict:
    from owl2_edge.vision import VisionEncoder
    m = Manifest.load(folder)
    path = folder / m.vision_files[variant]
    load_s, encoder = timed(VisionEncoder, path, device, n_threads=threads, cache_size=0)
    pixels = sample_pixels(m)
    encoder.encode(pixels)  # warm-up: ONNX Runtime's first run allocates its arenas
    image_s, _ = timed(encoder.encode, pixels)
    return {"variant": variant, "provider": encoder.provider, "load_s": load_s,
            "image_s": image_s, "images_per_s": 1 / image_s,
            "files_bytes": file_bytes(folder, path.name)}


def vision_torch(folder: Path, threads: int, **_) -> dict:
    """The reference vision of the folder's shape, with random weights as the folder's own
    (the speed of a float32 PyTorch forward depends on the shapes only). CPU only."""
    import torch

    from owl2_edge.tools.bench.shapes import shape_config_file
    from owl2_edge.convert import hf_layout
    from owl2_edge.convert.config import Owl2Config
    from owl2_edge.convert.reference import Owl2Vision
    from owl2_edge.convert.tiny import random_tensor
    described = json.loads(shape_config_file(folder).read_text())
    cfg = Owl2Config.from_dicts(described["config"], described["preprocessor"])
    torch.set_num_threads(threads)

    def build():
        shapes = hf_layout.expected_shapes(cfg)
        return Owl2Vision.from_state_dict(
            cfg, {n: random_tensor(n, shapes[n], 0) for n in Owl2Vision.checkpoint_names(cfg)})
    build_s, vision = timed(build)
    pixels = torch.from_numpy(sample_pixels(Manifest.load(folder)))
    with torch.no_grad():
        vision(pixels)  # warm-up, as for ONNX Runtime
        image_s, _ = timed(vision, pixels)
    return {"variant": "torch", "provider": "PyTorch CPU float32", "load_s": build_s,
            "image_s": image_s, "images_per_s": 1 / image_s}


# --- Questions through the Owl2 API ----------------------------------------------------------

def first_piece_seconds(owl, image, question: str) -> float:
    """Seconds from asking to the first token (the answer is one token long)."""
    t = time.perf_counter()
    for _ in owl.stream(image, question, max_tokens=1, temperature=0, ignore_eos=True):
        break
    return time.perf_counter() - t


def ask_api(folder: Path, threads: int, device: str, **_) -> dict:
    from owl2_edge.tools.demo_image import sample_image
    from owl2_edge.owl2 import Owl2
    load_s, owl = timed(Owl2.load, folder, device=device, n_ctx=ASK_N_CTX, n_threads=threads)
    image = sample_image()
    first_s = first_piece_seconds(owl, image, QUESTION)
    first = owl.stats
    second_s = first_piece_seconds(owl, image, SECOND_QUESTION)
    second = owl.stats
    m = owl.manifest
    return {"load_s": load_s, "first_token_s": first_s, "second_token_s": second_s,
            "first_positions": first.evaluated_positions,
            "second_positions": second.evaluated_positions,
            "second_reused_positions": second.reused_positions,
            "vision_file": owl.vision.path.name, "device": owl.decoder.device,
            "files_bytes": file_bytes(folder, m.decoder_file, m.mam_file, owl.vision.path.name),
            "kv_bytes": kv_cache_bytes(m, ASK_N_CTX)}


def stock(folder: Path, threads: int, device: str, **_) -> dict:
    from owl2_edge.tools.bench.stock import stock_pipeline
    return stock_pipeline(folder, threads, device)


WORKERS: dict[str, Callable[..., dict]] = {
    "decoder-ours": decoder_ours, "decoder-llama.cpp": decoder_llama_cpp,
    "vision": vision_onnx, "vision-torch": vision_torch, "ask-api": ask_api, "stock": stock}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m owl2_edge.tools.bench.workers",
                                 description="One owl2 bench measurement, as one JSON line.")
    ap.add_argument("kind", choices=sorted(WORKERS))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--device", choices=DEVICES, default="cpu")
    ap.add_argument("--variant", help="the vision file (vision)")
    args = ap.parse_args(argv)
    try:
        result = WORKERS[args.kind](args.folder, threads=args.threads, device=args.device,
                                    variant=args.variant)
    except Owl2Error as e:
        sys.exit(str(e))  # one line on stderr, which the runner shows
    result["peak_rss_bytes"] = peak_rss_bytes()
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
