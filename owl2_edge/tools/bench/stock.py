"""The stock pipeline: mPLUG-Owl2 as one would stitch it by hand from stock parts, ONNX Runtime
for the vision file (fp32, as exported) and stock llama.cpp on the base GGUF, with the image's
embeddings fed to llama.cpp through a llama_batch's `embd`.

Its answers are wrong for this model: llama.cpp has no Modality-Adaptive Module, so the image
positions take the text route. That is the point of owl2-edge; here only the time counts. It
has no cache of embeddings or of prompt prefixes either: a second question about the same image
costs what the first did. The prompt is the project's own (template and chunk-wise tokenization),
so both pipelines evaluate the same ids.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np

from owl2_edge.tools.bench.workers import (ASK_N_CTX, N_BATCH, QUESTION, SECOND_QUESTION,
                                     check_llama_cpp_device, file_bytes, kv_cache_bytes, timed)
from owl2_edge.errors import Owl2Error
from owl2_edge.model_dir import Manifest
from owl2_edge.names import IMAGE_TOKEN_ID, ONNX_INPUT, ONNX_OUTPUT

# The vision file the stock pipeline runs: fp32, the exported one; a folder without it (convert's
# default writes int8 and fp16) gives the next in this order, and the row names the file.
STOCK_VISION = ("fp32", "fp16", "int8", "int4")


class StockLlama:
    """llama.cpp's own context on the base GGUF, fed through its low-level API."""

    def __init__(self, path: Path, threads: int, device: str, n_ctx: int):
        import llama_cpp

        from owl2_edge.tools import llama_stock
        from owl2_edge.llama_log import captured_llama_log, init_llama_backend
        self.api = llama_cpp
        init_llama_backend()
        on_gpu = check_llama_cpp_device(device)
        model_params = llama_stock.model_params()
        model_params.n_gpu_layers = -1 if on_gpu else 0
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = n_ctx
        context_params.n_batch = context_params.n_ubatch = N_BATCH
        context_params.n_threads = context_params.n_threads_batch = threads
        # As ours: the unfused attention on the CPU (ours' default), the fused one on a GPU.
        context_params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if on_gpu
                                          else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        with captured_llama_log() as log:  # quiet, and its first error if it fails
            self.model = llama_cpp.llama_model_load_from_file(os.fsencode(path), model_params)
            self.ctx = self.model and llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.ctx:
            raise Owl2Error(f"{path}: stock llama.cpp could not load it "
                            f"({log.first_error() or 'no reason given'})")
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_past = 0

    def clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def eval_tokens(self, ids: list[int]) -> np.ndarray:
        """A text run; the logits of its last position."""
        def fill(batch, start, rows):
            for i in range(rows):
                batch.token[i] = ids[start + i]
        self._decode(len(ids), 0, fill)
        return np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.ctx, -1),
                                     shape=(self.n_vocab,)).copy()

    def eval_embeddings(self, embeds: np.ndarray) -> None:
        """An image's embeddings [n, n_embd] as input rows (llama_batch.embd)."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        row = self.n_embd * 4

        def fill(batch, start, rows):
            ctypes.memmove(batch.embd, embeds[start:].ctypes.data, rows * row)
        self._decode(len(embeds), self.n_embd, fill)

    def _decode(self, n: int, n_embd: int, fill) -> None:
        """n positions from n_past on, in batches of at most N_BATCH; logits for the last."""
        for start in range(0, n, N_BATCH):
            rows = min(N_BATCH, n - start)
            batch = self.api.llama_batch_init(rows, n_embd, 1)
            try:
                batch.n_tokens = rows
                for i in range(rows):
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = int(start + i == n - 1)
                fill(batch, start, rows)
                status = self.api.llama_decode(self.ctx, batch)
            finally:
                self.api.llama_batch_free(batch)
            if status != 0:
                raise Owl2Error(f"stock llama.cpp: llama_decode returned {status}")
            self.n_past += rows

    def close(self) -> None:
        from owl2_edge.llama_log import captured_llama_log
        with captured_llama_log():  # llama_free logs its buffers' sizes
            self.api.llama_free(self.ctx)
            self.api.llama_model_free(self.model)


def vision_session(path: Path, threads: int, device: str):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def first_token_seconds(session, llama: StockLlama, tokenizer, spec, image, question: str
                        ) -> float:
    """One question about a new image, from the picture to the first token: pixels, the vision
    run, then llama.cpp's prefill of "<s>USER: ", the image's rows and the question."""
    from owl2_edge.image import preprocess
    from owl2_edge.prompt import Turn, render
    t = time.perf_counter()
    pixels = preprocess(image, spec)[None]
    embeds = session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0][0]
    ids = tokenizer.tokenize(render([Turn(question)], n_images=1))
    cut = ids.index(IMAGE_TOKEN_ID)
    llama.clear()
    llama.eval_tokens(ids[:cut])
    llama.eval_embeddings(embeds)
    int(np.argmax(llama.eval_tokens(ids[cut + 1:])))  # greedy: the first token
    return time.perf_counter() - t


def stock_pipeline(folder: Path, threads: int, device: str) -> dict:
    from owl2_edge.tools.demo_image import sample_image
    from owl2_edge.tokenizer import Tokenizer
    m = Manifest.load(folder)
    variant = next(v for v in STOCK_VISION if v in m.vision_files)
    vision_file = m.vision_files[variant]

    def load():
        return (vision_session(folder / vision_file, threads, device),
                StockLlama(folder / m.decoder_file, threads, device, ASK_N_CTX),
                Tokenizer(folder / m.decoder_file))
    load_s, (session, llama, tokenizer) = timed(load)
    image = sample_image()
    first_s = first_token_seconds(session, llama, tokenizer, m.image, image, QUESTION)
    # The wall clock, for the parent: its process start -> this first token.
    first_token_at = time.time()
    second_s = first_token_seconds(session, llama, tokenizer, m.image, image, SECOND_QUESTION)
    llama.close()
    tokenizer.close()
    return {"load_s": load_s, "first_token_s": first_s, "second_token_s": second_s,
            "first_token_at": first_token_at, "vision_file": vision_file,
            "files_bytes": file_bytes(folder, m.decoder_file, vision_file),
            "kv_bytes": kv_cache_bytes(m, ASK_N_CTX)}
