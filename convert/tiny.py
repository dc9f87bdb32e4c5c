"""Writes a random mPLUG-Owl2 checkpoint in the release's exact layout (docs/architecture.md §5).

Tests and `owl2 demo` use the tiny size; benchmarks (`owl2 bench --shape`) use the named shapes
of SHAPES: the real 7B shape (Owl2Config()) and a ~1B one, generated and written one shard at a
time so memory stays bounded (about one shard: ~1.5 GB at 7B).

Every tensor is drawn from its own generator, seeded by (seed, tensor name): the result does not
depend on the order of generation, and the visual route (`multiway.1`) is independent of the text
route (`multiway.0`), so a runtime that ignores MAM gives clearly different outputs.

The tokenizer is a sentencepiece BPE model trained here, with LLaMA's conventions, on a generated
English-like corpus. Its vocabulary has 512 pieces; a config with a larger vocabulary (the real
32000) gets that model padded with pieces `<unused{n}>` that no text can reach (a BPE merge needs
both halves to be pieces, and no proper part of `<unused{n}>` containing `<` or `>` is one), so
every text tokenizes exactly as with the 512-piece model.

    python -m owl2_edge.convert.tiny OUT_DIR [--seed N] [--shape tiny|1b|7b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import math
import random
import zlib
from pathlib import Path
from typing import Callable

import torch

from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import (CONFIG_FILE, PREPROCESSOR_FILE, AbstractorConfig,
                                      Owl2Config, PreprocessConfig, TextConfig, VisionConfig)

TINY_VOCAB = 512

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHTS_FORMATS = ("bin", "safetensors")


# --- Config ---------------------------------------------------------------------------------------

def tiny_config(*, text: dict | None = None, vision: dict | None = None,
                abstractor: dict | None = None) -> Owl2Config:
    """Small dims in which every decoder and abstractor row width is a multiple of 32 (a ggml
    quant block). Override any field per part, e.g. tiny_config(text={"hidden_size": 256}) for
    K-quants (their super-blocks need rows of 256). The abstractor grid, encoder width and the
    preprocessor size follow the vision tower unless overridden."""
    t = dataclasses.replace(TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=4, max_position_embeddings=2048), **(text or {}))
    v = dataclasses.replace(VisionConfig(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        image_size=56, patch_size=14), **(vision or {}))
    a = dataclasses.replace(AbstractorConfig(
        num_queries=8, hidden_size=v.hidden_size, num_layers=2, num_heads=2,
        intermediate_size=64, encoder_hidden_size=v.hidden_size, grid_size=v.grid_size),
        **(abstractor or {}))
    cfg = Owl2Config(text=t, vision=v, abstractor=a,
                     preprocess=PreprocessConfig(image_size=v.image_size))
    # Validate through the reader, so an impossible override fails here and not in a test.
    return Owl2Config.from_dicts(cfg.to_config_dict(), cfg.to_preprocessor_dict(),
                                 source="tiny_config")


def one_b_config() -> Owl2Config:
    """A ~1B mPLUG-Owl2 for benchmarks, between the tiny test model and the 7B release.

    Decoder: TinyLlama-1.1B's width, FFN and head size (2048, 5632, 128) with LLaMA-2's full
    multi-head attention (16 K/V heads, as in the release, so that the MAM sidecar's K/V have
    the release's form) and 16 layers: ~0.95 B shared and text-route weights plus 0.13 B of
    visual route. Rows of 2048 and 5632 are multiples of 256, so every K-quant applies as at 7B.
    Vision: a ViT-B-sized tower (768 wide, 12 layers, 12 heads, MLP 3072; ~86 M) at the
    release's 448 px and patch 14, so the grid (32 x 32: 1025 positions) and the abstractor's
    cross-attention length are the release's. Abstractor: 768 wide (it reads the tower's
    features), the release's 6 layers and 64 queries, FFN 2112 (the release's 2.75 x width): an
    image still takes 65 decoder positions, so image-prefill figures compare with 7B's. 1.2 B
    parameters in all, 2.4 GB in bfloat16."""
    return tiny_config(
        text={"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
              "num_layers": 16, "num_heads": 16, "num_kv_heads": 16},
        vision={"hidden_size": 768, "intermediate_size": 3072, "num_layers": 12, "num_heads": 12,
                "image_size": 448, "patch_size": 14},
        abstractor={"num_queries": 64, "hidden_size": 768, "num_layers": 6, "num_heads": 12,
                    "intermediate_size": 2112})


# The named shapes (`--shape` below, `owl2 bench --shape`): "tiny" for tests, "1b", and "7b", the
# release's own (Owl2Config's defaults).
SHAPES: dict[str, Callable[[], Owl2Config]] = {
    "tiny": tiny_config, "1b": one_b_config, "7b": Owl2Config}


# --- Weights --------------------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _is_norm_weight(name: str) -> bool:
    if "layernorm.multiway." in name:  # the decoder's per-modality RMSNorms
        return True
    return name.endswith(("norm.weight", "ffn_ln.weight", "norm1.weight", "normk.weight",
                          "norm2.weight"))


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 values scaled so activations and logits stay of order 1: Linear weights
    normal/sqrt(fan_in), norm weights 1 + small noise, biases small, embeddings unit normal."""
    g = _generator(seed, name)
    z = torch.randn(shape, generator=g, dtype=torch.float32)
    if _is_norm_weight(name):
        return 1.0 + 0.1 * z
    if name.endswith(".bias"):
        return 0.02 * z
    if name in (hf_layout.EMBED_TOKENS, f"{hf_layout.ABSTRACTOR_PREFIX}vit_eos",
                f"{hf_layout.ABSTRACTOR_PREFIX}query_embeds",
                f"{hf_layout.VISION_PREFIX}embeddings.cls_token"):
        return z
    if name == f"{hf_layout.VISION_PREFIX}embeddings.position_embedding":
        return 0.5 * z
    fan_in = math.prod(shape[1:])  # Linear [out, in] and the patch conv [out, 3, p, p]
    return z / math.sqrt(fan_in)


def rotary_inv_freq(cfg: Owl2Config) -> torch.Tensor:
    hd = cfg.text.head_dim
    return 1.0 / (cfg.text.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))


# name, shape -> float32 tensor: random_tensor for a random checkpoint, a lookup for a trained one.
TensorSource = Callable[[str, tuple[int, ...]], torch.Tensor]


def _shard_tensors(cfg: Owl2Config, names: list[str], source: TensorSource,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = hf_layout.expected_shapes(cfg)
    tensors = {n: source(n, shapes[n]).to(dtype) for n in names}
    # The release stores each layer's RoPE buffer beside its weights (in the weights' dtype).
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    for i in sorted(layers):
        tensors[hf_layout.rotary_inv_freq_name(i)] = rotary_inv_freq(cfg).to(dtype)
    return tensors


def _save(tensors: dict[str, torch.Tensor], path: Path, weights_format: str) -> None:
    if weights_format == "bin":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata={"format": "pt"})


def _write_weights(out: Path, cfg: Owl2Config, source: TensorSource, dtype: torch.dtype,
                   weights_format: str, sharded: bool,
                   on_file: Callable[[str], None] | None) -> None:
    plan = hf_layout.release_shard_plan(cfg)
    if not sharded:
        single = (hf_layout.PICKLE_SINGLE if weights_format == "bin"
                  else hf_layout.SAFETENSORS_SINGLE)
        _save(_shard_tensors(cfg, [n for names in plan for n in names], source, dtype),
              out / single, weights_format)
        if on_file:
            on_file(single)
        return
    shard_file = (hf_layout.pickle_shard_file if weights_format == "bin"
                  else hf_layout.safetensors_shard_file)
    index_file = (hf_layout.PICKLE_INDEX if weights_format == "bin"
                  else hf_layout.SAFETENSORS_INDEX)
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, names in enumerate(plan, start=1):
        file = shard_file(k, len(plan))
        tensors = _shard_tensors(cfg, names, source, dtype)
        _save(tensors, out / file, weights_format)
        for name, tensor in tensors.items():
            weight_map[name] = file
            total_size += tensor.numel() * tensor.element_size()
        del tensors  # one shard in memory at a time
        if on_file:
            on_file(file)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / index_file).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# --- Tokenizer ------------------------------------------------------------------------------------

_WORDS = """
the a an of to and in is it that was for on are with as his her they be at one have this from or
had by word but what some we can out other were all there when up use your how said each she which
do their time if will way about many then them write would like so these long make thing see him
two has look more day could go come did number sound no most people my over know water than call
first who may down side been now find any new work part take get place made live where after back
little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
image photo cat dog woman child red blue green yellow white black orange purple sofa table street
car bus train bicycle describe question answer colour color banner striped sky tree window book
person holding sitting standing wearing shirt hat left top bottom front behind next beside people
""".split()
_CAPITALIZED = ["I", "What", "Where", "How", "Is", "Are", "The", "A", "This", "There", "Yes", "No",
                "London", "Paris", "France", "Describe", "Answer", "Please"]
_FOREIGN = ["café", "naïve", "résumé", "über", "señor", "façade", "jalapeño", "Zürich", "déjà", "vu",
            "voilà", "crème", "brûlée", "São", "Paulo", "你好", "世界", "猫", "狗", "日本語", "東京",
            "こんにちは", "한국어", "Ελλάδα", "Москва"]
_PUNCT_TAIL = ' "quoted" - $3.50 & 100% #tag @home [x] {y} (z) / \\ | ~ ^ * + = _ \' ` ...'


def _corpus(n_sentences: int = 3000) -> list[str]:
    """A deterministic English-like text with chat turns, digits, punctuation, accents and CJK."""
    rng = random.Random(20231127)
    lines = []
    for _ in range(n_sentences):
        words = []
        for _ in range(rng.randint(3, 14)):
            x = rng.random()
            if x < 0.07:
                words.append(str(rng.randint(0, 99999)) if rng.random() < 0.7
                             else f"{rng.randint(0, 999)}.{rng.randint(0, 99)}")
            elif x < 0.11:
                words.append(rng.choice(_FOREIGN))
            elif x < 0.18:
                words.append(rng.choice(_CAPITALIZED))
            else:
                words.append(rng.choice(_WORDS))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(".?!,;:")
        if rng.random() < 0.25:
            text = f"USER: {text} ASSISTANT: {rng.choice(_WORDS).capitalize()}."
        if rng.random() < 0.05:
            text += _PUNCT_TAIL
        if rng.random() < 0.05:
            text = "\t" + text + "  \n  indented"
        lines.append(text)
    return lines


@functools.lru_cache(maxsize=None)
def _trained_tokenizer(vocab_size: int) -> bytes:
    return train_tokenizer(_corpus(), vocab_size)


def train_tokenizer(sentences: list[str], vocab_size: int = TINY_VOCAB) -> bytes:
    """A serialized sentencepiece BPE model trained on `sentences` with LLaMA's conventions."""
    import sentencepiece as spm

    model = io.BytesIO()
    # LLaMA's trainer settings: BPE, byte fallback, digits split, dummy prefix, whitespace kept,
    # no normalization; <unk>=0 <s>=1 </s>=2, no pad. One thread keeps the result deterministic.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, minloglevel=2)
    return model.getvalue()


@functools.lru_cache(maxsize=None)
def tokenizer_model_bytes(vocab_size: int = TINY_VOCAB) -> bytes:
    """A serialized sentencepiece ModelProto with exactly vocab_size pieces (cached per process)."""
    if vocab_size <= TINY_VOCAB:
        return _trained_tokenizer(vocab_size)
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(_trained_tokenizer(TINY_VOCAB))
    lowest = min(p.score for p in proto.pieces)
    for n in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece = f"<unused{n}>"
        piece.score = lowest - 1.0 - n
        piece.type = sp_pb2.ModelProto.SentencePiece.NORMAL
    return proto.SerializeToString()


def _tokenizer_files(cfg: Owl2Config) -> dict[str, str]:
    t = cfg.text
    return {
        "tokenizer_config.json": json.dumps({
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": t.max_position_embeddings,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        }, indent=2),
        "special_tokens_map.json": json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2),
    }


# --- The checkpoint folder ------------------------------------------------------------------------

def make_tiny_checkpoint(out_dir: str | Path, *, config: Owl2Config | None = None, seed: int = 0,
                         dtype: str = "bfloat16", weights_format: str = "bin",
                         sharded: bool = True, tokenizer: bool = True,
                         on_file: Callable[[str], None] | None = None,
                         tensors: dict[str, torch.Tensor] | None = None,
                         tokenizer_model: bytes | None = None) -> Path:
    """Write a checkpoint folder like the release's: config.json, preprocessor_config.json,
    generation_config.json, the tokenizer files (unless tokenizer=False), and the weights as
    the release's shards + index (sharded) or one file. Same seed, same bytes of weights.

    `tensors` (HF names -> tensors, every name of the layout) replaces the random weights, and
    `tokenizer_model` (sentencepiece bytes) the generated tokenizer: that is how the trained demo
    model (train_demo.py) is written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights_format {weights_format!r}: choose one of {WEIGHTS_FORMATS}")
    cfg = config or tiny_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config_dict = cfg.to_config_dict()
    config_dict["torch_dtype"] = dtype
    files = {
        CONFIG_FILE: json.dumps(config_dict, indent=2),
        PREPROCESSOR_FILE: json.dumps(cfg.to_preprocessor_dict(), indent=2),
        "generation_config.json": json.dumps({
            "_from_model_config": True,
            "bos_token_id": cfg.text.bos_token_id,
            "eos_token_id": cfg.text.eos_token_id,
            "transformers_version": "4.32.0",
        }, indent=2),
    }
    if tokenizer:
        files.update(_tokenizer_files(cfg))
        (out / hf_layout.TOKENIZER_MODEL).write_bytes(
            tokenizer_model or tokenizer_model_bytes(cfg.text.vocab_size))
    for name, text in files.items():
        (out / name).write_text(text + "\n", encoding="utf-8")

    if tensors is None:
        source = functools.partial(random_tensor, seed=seed)
    else:
        missing = sorted(set(hf_layout.expected_shapes(cfg)) - set(tensors))
        if missing:
            raise ValueError(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
        source = lambda name, shape: tensors[name].reshape(shape).float()  # noqa: E731
    _write_weights(out, cfg, source, DTYPES[dtype], weights_format, sharded, on_file)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m owl2_edge.convert.tiny",
        description="Write a random mPLUG-Owl2 checkpoint in the release's layout.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                      help="tiny (tests), 1b (about 2.4 GB in bfloat16) or 7b (the release's "
                           "shape, about 16 GB)")
    size.add_argument("--real-size", action="store_true", help="the same as --shape 7b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--format", choices=WEIGHTS_FORMATS, default="bin")
    args = parser.parse_args(argv)
    cfg = SHAPES["7b" if args.real_size else args.shape]()
    make_tiny_checkpoint(args.out_dir, config=cfg, seed=args.seed, dtype=args.dtype,
                         weights_format=args.format,
                         on_file=lambda f: print(f"wrote {args.out_dir / f}", flush=True))


if __name__ == "__main__":
    main()
