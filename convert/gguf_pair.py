"""The decoder as two GGUF files (docs/design.md §2): a stock llama.cpp LLaMA file holding the text
route, and the MAM sidecar holding what the Modality-Adaptive Module adds (the visual route).

    base_path, mam_path = write_gguf_pair(ckpt, out_dir, "Q4_K_M", pair_id)

F32, F16 and BF16 are written here directly. Every other type is made by llama.cpp's own
quantizer from an F16 base written first to a temporary file, and the sidecar mirrors the
finished base's types (owl2_edge/quant.py, shared with `owl2 quantize`).

Why F16 for the temporary base: every bfloat16 or float16 weight of the release in float16's
normal range is exactly representable in float16 (bf16 has 8 mantissa bits, f16 has 11), so
nothing the quantizer sees is lost; it is half the disk of F32 (13 GB, not 27 GB, for 7B); and
it is llama.cpp's own convert-then-quantize path. Values above 65504 are refused, not clipped.

Memory: tensors are streamed one checkpoint file at a time (a 7B conversion holds about one
layer's float32 weights, or the embeddings). gguf-py's GGUFWriter writes tensor data in the order
the infos were declared, so the infos are declared up front, from the config's shapes, in exactly
the order the checkpoint's files will be read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from owl2_edge import gguf_names, names
from owl2_edge import quant as quant_mod
from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import Owl2Config
from owl2_edge.convert.gguf_vocab import GGUFVocab, read_sentencepiece_vocab
from owl2_edge.errors import CheckpointError
from owl2_edge.quant import QUANT_TYPES, check_quant  # noqa: F401 (re-exported)

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# progress(done, total): units are checkpoint files read for the base, one for llama.cpp's
# quantizer when it runs, and one per decoder layer of the sidecar.
Progress = Callable[[int, int], None]


# --- Which checkpoint tensor goes where ---------------------------------------------------------

@dataclass(frozen=True)
class Target:
    gguf_name: str
    shape: tuple[int, ...]   # PyTorch's (rows, cols); GGUF stores the reverse
    rope_heads: int = 0      # > 0: permute rows for llama.cpp's RoPE over this many heads


def base_targets(cfg: Owl2Config) -> dict[str, Target]:
    """HF name -> its tensor in the base file: the shared weights and the TEXT route."""
    return _targets(cfg, names.TEXT_ROUTE, include_shared=True)


def mam_targets(cfg: Owl2Config) -> dict[str, Target]:
    """HF name -> its tensor in the sidecar: the VISUAL route of the MAM-doubled parts, under the
    very names the base uses for the text route."""
    return _targets(cfg, names.VISUAL_ROUTE, include_shared=False)


def _targets(cfg: Owl2Config, route: int, include_shared: bool) -> dict[str, Target]:
    shapes = hf_layout.expected_shapes(cfg)
    dims = hf_layout.decoder_dims(cfg)
    targets: dict[str, Target] = {}
    if include_shared:
        for hf, gg in ((hf_layout.EMBED_TOKENS, gguf_names.TOKEN_EMBD),
                       (hf_layout.FINAL_NORM, gguf_names.OUTPUT_NORM),
                       (hf_layout.LM_HEAD, gguf_names.OUTPUT)):
            targets[hf] = Target(gg, shapes[hf])
    parts = gguf_names.LAYER_PARTS if include_shared else gguf_names.ROUTED_LAYER_PARTS
    for i in range(cfg.text.num_layers):
        for part in parts:
            hf = hf_layout.decoder_layer_name(i, part, route if part.routed else None)
            # Q and both routes of K are rotated by RoPE (each K feeds the same attention); V never.
            rope_heads = dims[part.rope_heads] if part.rope_heads else 0
            targets[hf] = Target(part.gguf_name(i), shapes[hf], rope_heads)
    return targets


def hf_to_gguf_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection from HF's RoPE layout to llama.cpp's.

    HF LLaMA rotates dim j of a head together with dim j + d/2 ("rotate_half"); llama.cpp's
    llama graph rotates adjacent pairs (2j, 2j+1). Moving row j to 2j and row j + d/2 to 2j+1 in
    every head makes llama.cpp rotate the same pairs by the same angle. Attention only sees q·k,
    which is unchanged when Q and K are permuted alike; V is not rotated and must stay as is.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_to_hf_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of hf_to_gguf_rope_rows (for tests and inspection)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --- Encoding tensors -----------------------------------------------------------------------------

def encode_tensor(values: np.ndarray, target: Target, ggml_type: int,
                  importance: np.ndarray | None = None) -> np.ndarray:
    """float32 checkpoint values -> the bytes GGUF stores for them ([rows, row_bytes] uint8)."""
    values = np.asarray(values, dtype=np.float32)
    if target.rope_heads:
        values = hf_to_gguf_rope_rows(values, target.rope_heads)
    return quant_mod.encode(values, target.gguf_name, ggml_type, importance)


# --- The pair -------------------------------------------------------------------------------------

def write_gguf_pair(ckpt, out_dir: str | Path, quant: str, pair_id: str,
                    progress: Progress | None = None, importance=None) -> tuple[Path, Path]:
    """Write the base and sidecar GGUF files of `ckpt` (a convert.checkpoint.Checkpoint) into
    out_dir; returns their paths. Files appear under their final names only when complete.
    importance: an owl2_edge.tools.imatrix.ImportanceMatrix for the quantizers, or None."""
    qt = QUANT_TYPES[check_quant(quant)]
    quant_mod.check_imatrix_need(qt.name, importance)
    if not pair_id or not isinstance(pair_id, str):
        raise ValueError("pair_id must be a non-empty string")
    cfg = ckpt.config
    vocab = read_sentencepiece_vocab(ckpt.tokenizer_model)
    _check_vocab(vocab, cfg, ckpt.tokenizer_model)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_path = out_dir / names.base_gguf_file(qt.name)
    mam_path = out_dir / names.mam_gguf_file(qt.name)

    base_plan = _shard_plan(ckpt, base_targets(cfg))
    total = len(base_plan) + (0 if qt.direct is not None else 1) + cfg.text.num_layers
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with quant_mod.written_atomically(base_path) as part:
        if qt.direct is not None:
            _write_base(ckpt, base_plan, vocab, part, qt.direct, qt.file_type, pair_id, tick)
        else:
            # F16 first, then llama.cpp's quantizer: `owl2 quantize` from an F16 folder takes
            # this very path, so both give the same bytes.
            with quant_mod.removed_after(out_dir / f".{base_path.name}.f16.tmp") as f16:
                _write_base(ckpt, base_plan, vocab, f16, T.F16, FT.MOSTLY_F16, pair_id, tick)
                quant_mod.llama_quantize(f16, part, qt, importance.for_base() if importance else None)
            tick()

    targets = mam_targets(cfg)
    header = quant_mod.SidecarHeader(cfg.text.num_layers, cfg.text.hidden_size, cfg.text.kv_width,
                                     pair_id)
    with quant_mod.written_atomically(mam_path) as part:
        quant_mod.write_sidecar(
            part, header, [(tg.gguf_name, tg.shape) for tg in targets.values()],
            _sidecar_layers(ckpt, targets), quant_mod.read_tensor_types(base_path),
            importance.for_sidecar() if importance else None, tick)
    return base_path, mam_path


def _check_vocab(vocab: GGUFVocab, cfg: Owl2Config, source: Path) -> None:
    t = cfg.text
    if vocab.n_vocab != t.vocab_size:
        raise CheckpointError(f"{source}: {vocab.n_vocab} pieces, but config.json's vocab_size "
                              f"is {t.vocab_size}")
    if (vocab.bos_id, vocab.eos_id) != (t.bos_token_id, t.eos_token_id):
        raise CheckpointError(f"{source}: BOS/EOS ids {vocab.bos_id}/{vocab.eos_id} differ from "
                              f"config.json's {t.bos_token_id}/{t.eos_token_id}")


def _shard_plan(ckpt, targets: dict[str, Target]) -> list[tuple[str, list[str]]]:
    """(file, HF names in it that go to `targets`) in reading order; every target exactly once."""
    plan = []
    for shard in ckpt.shards:
        wanted = [n for n in ckpt.names_in(shard) if n in targets]
        if wanted:
            plan.append((shard, wanted))
    planned = [n for _, ns in plan for n in ns]
    if sorted(planned) != sorted(targets):  # the checkpoint's index promises all of them
        missing = sorted(set(targets) - set(planned))
        raise CheckpointError(f"{ckpt.path}: no file holds {missing[0] if missing else 'a tensor'}")
    return plan


def add_base_kv(writer: gguf.GGUFWriter, cfg: Owl2Config, vocab: GGUFVocab | None,
                file_type: FT, pair_id: str) -> None:
    """The base file's keys. vocab None leaves the tokenizer out (benchmarks/quant_sizes.py's
    header-only file: llama.cpp's quantizer does not read it)."""
    t = cfg.text
    writer.add_name(quant_mod.MODEL_NAME)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(t.vocab_size)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_heads)
    writer.add_head_count_kv(t.num_kv_heads)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_rope_dimension_count(t.head_dim)
    if vocab is not None:
        vocab.write_to(writer)
    writer.add_string(gguf_names.KEY_PAIR_ID, pair_id)


def _tensor_type(shape: tuple[int, ...], matrix_type: int) -> int:
    # 1-D tensors (the norms) stay float32, as llama.cpp keeps them.
    return matrix_type if len(shape) > 1 else T.F32


def _write_base(ckpt, plan, vocab: GGUFVocab, path: Path, matrix_type: int, file_type: FT,
                pair_id: str, tick: Callable[[], None]) -> None:
    cfg = ckpt.config
    targets = base_targets(cfg)
    with contextlib.closing(gguf.GGUFWriter(path, gguf_names.ARCHITECTURE)) as writer:
        add_base_kv(writer, cfg, vocab, file_type, pair_id)
        for _, hf_names in plan:
            for n in hf_names:
                tg = targets[n]
                quant_mod.declare(writer, tg.gguf_name, tg.shape, _tensor_type(tg.shape, matrix_type))
        quant_mod.write_preamble(writer)
        for _, hf_names in plan:
            tensors = ckpt.load(hf_names)  # only what the base needs from this file
            for n in hf_names:
                tg = targets[n]
                values = tensors.pop(n).numpy()
                writer.write_tensor_data(encode_tensor(values, tg, _tensor_type(tg.shape,
                                                                                 matrix_type)))
                del values
            tick()


def _sidecar_layers(ckpt, targets: dict[str, Target]) -> Iterator[list[np.ndarray]]:
    """The visual route's tensors, one decoder layer at a time, in GGUF's row order."""
    for i in range(ckpt.config.text.num_layers):
        layer = [hf_layout.multiway_name(i, part, names.VISUAL_ROUTE)
                 for part in gguf_names.ROUTED_LAYER_PARTS]  # the declaration order
        tensors = ckpt.load(layer)
        out = []
        for n in layer:
            values = tensors.pop(n).numpy().astype(np.float32)
            rope_heads = targets[n].rope_heads
            out.append(hf_to_gguf_rope_rows(values, rope_heads) if rope_heads else values)
        yield out
