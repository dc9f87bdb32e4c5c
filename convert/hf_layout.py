"""The Hugging Face side of the tensor names: every tensor of the mPLUG-Owl2 release, its shape,
and which file of the release holds it (docs/architecture.md §4, §5).

The GGUF side of the names, and the table of decoder layer parts that bridges the two, live in
owl2_edge/gguf_names.py.
Shapes are PyTorch's: Linear weights are [out, in].
"""

from __future__ import annotations

from owl2_edge import names
from owl2_edge.convert.config import Owl2Config
from owl2_edge.gguf_names import LAYER_PARTS, LayerPart

Shape = tuple[int, ...]

EMBED_TOKENS = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

VISION_PREFIX = "model.vision_model."
ABSTRACTOR_PREFIX = "model.visual_abstractor."

ROUTES = (names.TEXT_ROUTE, names.VISUAL_ROUTE)

# --- Decoder layers (docs/architecture.md §4) ----------------------------------------------------

# The parts of a layer, their release names and their llama.cpp names are one table:
# gguf_names.LAYER_PARTS. Here they are found by the release's name.
PART_BY_HF = {p.hf: p for p in LAYER_PARTS}


def _layer_part(part: str | LayerPart) -> LayerPart:
    if isinstance(part, LayerPart):
        return part
    if part not in PART_BY_HF:
        raise ValueError(f"unknown decoder part {part!r}")
    return PART_BY_HF[part]


# Buffers that some checkpoints carry but that are recomputed from the config; never required.
OPTIONAL_BUFFER_SUFFIXES = (
    ".rotary_emb.inv_freq",
    ".attention.q_pos_embed",
    ".attention.k_pos_embed",
)


def decoder_layer_name(i: int, part: str | LayerPart, route: int | None = None) -> str:
    """`model.layers.{i}.{part}.weight`, or `...{part}.multiway.{route}.weight` for a routed part.
    `part`: the release's name ("self_attn.k_proj") or a gguf_names.LayerPart."""
    p = _layer_part(part)
    if p.routed:
        if route not in ROUTES:
            raise ValueError(f"{p.hf} is per modality: give route {ROUTES}, not {route!r}")
        return f"model.layers.{i}.{p.hf}.multiway.{route}.weight"
    if route is not None:
        raise ValueError(f"{p.hf} is shared by both modalities; it has no route")
    return f"model.layers.{i}.{p.hf}.weight"


def multiway_name(i: int, part: str | LayerPart, route: int) -> str:
    """The `route` (0 text, 1 visual) weight of a MAM-doubled part of decoder layer i."""
    if not _layer_part(part).routed:
        raise ValueError(f"{part!r} is not a per-modality part")
    return decoder_layer_name(i, part, route)


def rotary_inv_freq_name(i: int) -> str:
    """The RoPE buffer the release stores in each layer's file (ignored by the reader)."""
    return f"model.layers.{i}.self_attn.rotary_emb.inv_freq"


def is_optional_buffer(name: str) -> bool:
    return name.endswith(OPTIONAL_BUFFER_SUFFIXES)


def vision_layer_name(i: int, suffix: str) -> str:
    return f"{VISION_PREFIX}encoder.layers.{i}.{suffix}"


def abstractor_layer_name(i: int, suffix: str) -> str:
    return f"{ABSTRACTOR_PREFIX}encoder.layers.{i}.crossattention.{suffix}"


# --- Shapes ---------------------------------------------------------------------------------------

def decoder_dims(cfg: Owl2Config) -> dict[str, int]:
    """The values of gguf_names' dimension names (LayerPart.shape, .rope_heads) for a config."""
    t = cfg.text
    return {"n_embd": t.hidden_size, "n_embd_kv": t.kv_width, "n_ff": t.intermediate_size,
            "n_head": t.num_heads, "n_head_kv": t.num_kv_heads}


def part_shape(cfg: Owl2Config, part: LayerPart) -> Shape:
    dims = decoder_dims(cfg)
    return tuple(dims[d] for d in part.shape)


def decoder_layer_shapes(cfg: Owl2Config, i: int) -> dict[str, Shape]:
    """Every tensor of decoder layer i (both routes of the routed parts), in the math's order."""
    shapes = {}
    for part in LAYER_PARTS:
        for route in (ROUTES if part.routed else (None,)):
            shapes[decoder_layer_name(i, part, route)] = part_shape(cfg, part)
    return shapes


def text_top_shapes(cfg: Owl2Config) -> dict[str, Shape]:
    t = cfg.text
    return {
        EMBED_TOKENS: (t.vocab_size, t.hidden_size),
        FINAL_NORM: (t.hidden_size,),
        LM_HEAD: (t.vocab_size, t.hidden_size),
    }


def vision_shapes(cfg: Owl2Config) -> dict[str, Shape]:
    v = cfg.vision
    d, ff = v.hidden_size, v.intermediate_size
    p = VISION_PREFIX
    shapes = {
        f"{p}embeddings.cls_token": (1, 1, d),
        f"{p}embeddings.position_embedding": (1, v.num_positions, d),
        f"{p}embeddings.patch_embed.weight": (d, 3, v.patch_size, v.patch_size),  # no bias
        f"{p}embeddings.pre_layernorm.weight": (d,),
        f"{p}embeddings.pre_layernorm.bias": (d,),
    }
    layer = {
        "input_layernorm.weight": (d,),
        "input_layernorm.bias": (d,),
        # Fused, per-head interleaved [head][q|k|v][head_dim] (docs/architecture.md §2).
        "self_attn.query_key_value.weight": (3 * d, d),
        "self_attn.query_key_value.bias": (3 * d,),
        "self_attn.dense.weight": (d, d),
        "self_attn.dense.bias": (d,),
        "post_attention_layernorm.weight": (d,),
        "post_attention_layernorm.bias": (d,),
        "mlp.fc1.weight": (ff, d),
        "mlp.fc1.bias": (ff,),
        "mlp.fc2.weight": (d, ff),
        "mlp.fc2.bias": (d,),
    }
    for i in range(v.num_layers):
        shapes.update({vision_layer_name(i, s): shape for s, shape in layer.items()})
    shapes[f"{p}post_layernorm.weight"] = (d,)
    shapes[f"{p}post_layernorm.bias"] = (d,)
    return shapes


def abstractor_shapes(cfg: Owl2Config) -> dict[str, Shape]:
    a = cfg.abstractor
    d, ff, enc = a.hidden_size, a.intermediate_size, a.encoder_hidden_size
    p = ABSTRACTOR_PREFIX
    shapes = {f"{p}query_embeds": (1, a.num_queries, d)}
    layer = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "normk.weight": (enc,),
        "normk.bias": (enc,),
        "attention.query.weight": (d, d),
        "attention.query.bias": (d,),
        "attention.key.weight": (d, enc),
        "attention.key.bias": (d,),
        "attention.value.weight": (d, enc),
        "attention.value.bias": (d,),
        "output.out_proj.weight": (d, d),
        "output.out_proj.bias": (d,),
        "output.norm2.weight": (d,),
        "output.norm2.bias": (d,),
        "output.mlp.w1.weight": (ff, d),
        "output.mlp.w1.bias": (ff,),
        "output.mlp.w3.weight": (ff, d),
        "output.mlp.w3.bias": (ff,),
        "output.mlp.ffn_ln.weight": (ff,),
        "output.mlp.ffn_ln.bias": (ff,),
        "output.mlp.w2.weight": (d, ff),
        "output.mlp.w2.bias": (d,),
    }
    for i in range(a.num_layers):
        shapes.update({abstractor_layer_name(i, s): shape for s, shape in layer.items()})
    # visual_fc lifts the queries to the LLM width; vit_eos is already in it (appended after).
    shapes[f"{p}visual_fc.weight"] = (cfg.text.hidden_size, d)
    shapes[f"{p}visual_fc.bias"] = (cfg.text.hidden_size,)
    shapes[f"{p}vit_eos"] = (1, 1, cfg.text.hidden_size)
    return shapes


def expected_shapes(cfg: Owl2Config) -> dict[str, Shape]:
    """Every tensor the converter needs, in release order (decoder layers first)."""
    shapes: dict[str, Shape] = {}
    for i in range(cfg.text.num_layers):
        shapes.update(decoder_layer_shapes(cfg, i))
    shapes.update(text_top_shapes(cfg))
    shapes.update(vision_shapes(cfg))
    shapes.update(abstractor_shapes(cfg))
    return shapes


# --- The release's files (docs/architecture.md §5) ---------------------------------------------------------------------

PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
SAFETENSORS_SINGLE = "model.safetensors"
TOKENIZER_MODEL = "tokenizer.model"


def pickle_shard_file(k: int, n: int) -> str:
    """The release's names have no zero padding: pytorch_model-3-of-33.bin."""
    return f"pytorch_model-{k}-of-{n}.bin"


def safetensors_shard_file(k: int, n: int) -> str:
    return f"model-{k}-of-{n}.safetensors"


def release_shard_plan(cfg: Owl2Config) -> list[list[str]]:
    """Names per file as the upstream converter splits them: file k (1..L) holds decoder layer k-1,
    the last file everything else. (Readers must use the index, not this plan.)"""
    plan = [list(decoder_layer_shapes(cfg, i)) for i in range(cfg.text.num_layers)]
    plan.append([*text_top_shapes(cfg), *vision_shapes(cfg), *abstractor_shapes(cfg)])
    return plan
