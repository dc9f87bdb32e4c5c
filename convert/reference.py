"""A plain float32 PyTorch mPLUG-Owl2, written from docs/architecture.md and nothing else.

It is the oracle every test compares against and the module the vision ONNX is exported from,
so it favours reading over speed: one small module per part of the spec, the math top to bottom,
module attributes named so that the checkpoint's tensor names load with a few prefix renames.

    image  -> VisionTower (ViT-L/14) -> VisualAbstractor -> [n_visual, n_embd]
    prompt -> ids with IMAGE_TOKEN_ID -> splice -> MamDecoder (LLaMA-2 + MAM) -> logits

(docs/architecture.md §2, §3, §4.3 and §4, in that order.)

The places a re-implementation gets wrong (docs/architecture.md §9) carry a comment where they happen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import AbstractorConfig, Owl2Config, TextConfig, VisionConfig
from owl2_edge.errors import CheckpointError
from owl2_edge.names import IMAGE_TOKEN_ID, TEXT_ROUTE, VISUAL_ROUTE

# PyTorch's LayerNorm default. The abstractor's norm1/normk/norm2 are built without an eps
# argument upstream, so they use this and NOT the config's 1e-6 (docs/architecture.md §3, §9.5).
TORCH_LAYERNORM_EPS = 1e-5


# ================================================================================================
# Abstractor position tables (docs/architecture.md §3): computed, never loaded
# ================================================================================================

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: all sines first, then all cosines, ω_k = 10000^(-k/(dim/2)).

    Float32 numpy throughout, the way upstream builds it, so the tables match to the last bit or so.
    """
    half = dim // 2
    omega = np.arange(half, dtype=np.float32) / np.float32(half)
    omega = np.float32(1.0) / np.float32(10000.0) ** omega
    angles = np.outer(positions.reshape(-1).astype(np.float32), omega).astype(np.float32)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, column_first: bool = True) -> np.ndarray:
    """[1 + grid², dim] key table: row 0 (cls) zeros, row 1 + r·grid + c = [S(c), S(r)].

    MAE convention: the FIRST half encodes the column (x), the second half the row (y) (docs/architecture.md §9.4).
    `column_first=False` builds the wrong, swapped table; it exists only so a test can show that
    the swap matters.
    """
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32), indexing="ij")
    first, second = (cols, rows) if column_first else (rows, cols)
    patches = np.concatenate([sincos_1d(dim // 2, first), sincos_1d(dim // 2, second)], axis=1)
    cls = np.zeros((1, dim), dtype=np.float32)  # the cls key gets no position at all
    return np.concatenate([cls, patches], axis=0)


def abstractor_pos_tables(cfg: AbstractorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos [num_queries, D], k_pos [1 + grid², D]) as float32 tensors."""
    d = cfg.hidden_size
    q_pos = sincos_1d(d, np.arange(cfg.num_queries, dtype=np.float32))
    k_pos = sincos_2d(d, cfg.grid_size)
    return torch.from_numpy(q_pos), torch.from_numpy(k_pos)


# ================================================================================================
# Vision tower (docs/architecture.md §2)
# ================================================================================================

def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√d [+ mask])·v over [..., heads, T, d]; written out (no SDPA) so the ONNX
    export is a plain MatMul/Softmax graph and the reference has no kernel choice hidden in it."""
    # head_dim comes from the config, not from q.shape: a traced export then keeps it a constant.
    scores = q @ k.transpose(-1, -2) * (head_dim ** -0.5)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, H·d] -> [B, H, T, d]"""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [B, T, H·d], heads concatenated in head order."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, d))
        self.pre_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # row-major grid: r·G + c
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)  # cls is prepended: token 0
        x = x + self.position_embedding
        return self.pre_layernorm(x)  # CLIP's ln_pre, before the first block


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # The fused projection is interleaved PER HEAD: its outputs are [head][q|k|v][head_dim],
        # not three [Q;K;V] blocks (docs/architecture.md §9.1).
        qkv = self.query_key_value(x).view(b, t, self.n_heads, 3, -1)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, T, d]
        return self.dense(merge_heads(attention(q, k, v, self.head_dim)))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionTower(nn.Module):
    """pixels [N, 3, S, S] -> features [N, 1 + grid², D_vision] (cls first, after post-LN)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        # On ALL tokens, cls included: the abstractor reads the whole sequence, not a pooled cls.
        return self.post_layernorm(x)


# ================================================================================================
# Visual abstractor (docs/architecture.md §3)
# ================================================================================================

class AbstractorCrossAttention(nn.Module):
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(cfg.encoder_hidden_size, d)
        self.value = nn.Linear(cfg.encoder_hidden_size, d)

    def forward(self, queries, keys, q_pos, k_pos):
        # Positions go into Q and K only, never into V (docs/architecture.md §9.3).
        q = split_heads(self.query(queries + q_pos), self.n_heads)
        k = split_heads(self.key(keys + k_pos), self.n_heads)
        v = split_heads(self.value(keys), self.n_heads)
        return merge_heads(attention(q, k, v, self.head_dim))


class AbstractorMLP(nn.Module):
    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = nn.LayerNorm(cfg.intermediate_size, eps=cfg.ffn_ln_eps)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ffn_ln sits INSIDE the MLP, on the SwiGLU product, before w2 (docs/architecture.md §9.6).
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nn.Module):
    """Upstream's `encoder.layers.{i}.crossattention` ("attention." and "output." flattened)."""

    def __init__(self, cfg: AbstractorConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=TORCH_LAYERNORM_EPS)  # not the config's 1e-6 (docs/architecture.md §9.5)
        self.normk = nn.LayerNorm(cfg.encoder_hidden_size, eps=TORCH_LAYERNORM_EPS)
        self.attention = AbstractorCrossAttention(cfg)
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=TORCH_LAYERNORM_EPS)
        self.mlp = AbstractorMLP(cfg)

    def forward(self, x, image_features, q_pos, k_pos):
        qn = self.norm1(x)
        fn = self.normk(image_features)
        # The queries attend to themselves AND to the image: 64 + 1025 keys (docs/architecture.md §9.3).
        kv = torch.cat([qn, fn], dim=1)
        kv_pos = torch.cat([q_pos, k_pos], dim=0)
        # The residual is the NORMALISED queries, not x (docs/architecture.md §9.2).
        y = qn + self.out_proj(self.attention(qn, kv, q_pos, kv_pos))
        return y + self.mlp(self.norm2(y))


class VisualAbstractor(nn.Module):
    """features [N, 1 + grid², D_vision] -> image embeddings [N, num_queries + 1, n_embd]."""

    def __init__(self, cfg: AbstractorConfig, n_embd: int, swap_sincos_halves: bool = False):
        super().__init__()
        d = cfg.hidden_size
        self.num_queries = cfg.num_queries
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.num_queries, d))
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_layers))
        self.visual_fc = nn.Linear(d, n_embd)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, n_embd))
        q_pos, k_pos = abstractor_pos_tables(cfg)
        if swap_sincos_halves:  # deliberately wrong (row first); for tests only
            k_pos = torch.from_numpy(sincos_2d(d, cfg.grid_size, column_first=False))
        # Not persistent: the release checkpoint does not hold them (docs/architecture.md §9.15); in an ONNX
        # export they become constants.
        self.register_buffer("q_pos", q_pos, persistent=False)
        self.register_buffer("k_pos", k_pos, persistent=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        n = image_features.shape[0]
        # Sizes from the config, not -1 or a tensor's shape: the ONNX export then knows that the
        # output has n_visual rows of n_embd (only the batch stays symbolic).
        x = self.query_embeds.expand(n, self.num_queries, -1)
        for layer in self.layers:
            x = layer(x, image_features, self.q_pos, self.k_pos)
        # No final LayerNorm. vit_eos is appended AFTER visual_fc, already in LLM width (docs/architecture.md §9.7).
        queries = self.visual_fc(x)
        # vit_eos reaches the batch by broadcasting (0·q + eos == eos) rather than an Expand,
        # whose exported shape would hide that the output has exactly n_visual rows.
        vit_eos = queries[:, :1] * 0 + self.vit_eos
        return torch.cat([queries, vit_eos], dim=1)


class Owl2Vision(nn.Module):
    """pixels [N, 3, S, S] float32 -> image embeddings [N, n_visual, n_embd]; the ONNX graph."""

    def __init__(self, cfg: Owl2Config, swap_sincos_halves: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTower(cfg.vision)
        self.visual_abstractor = VisualAbstractor(cfg.abstractor, cfg.text.hidden_size,
                                                  swap_sincos_halves)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_abstractor(self.vision_model(pixels))

    @staticmethod
    def checkpoint_names(cfg: Owl2Config) -> list[str]:
        """The HF tensor names this module needs: vision + abstractor only, never the decoder."""
        return [*hf_layout.vision_shapes(cfg), *hf_layout.abstractor_shapes(cfg)]

    @classmethod
    def from_state_dict(cls, cfg: Owl2Config, state: Mapping[str, torch.Tensor],
                        swap_sincos_halves: bool = False) -> "Owl2Vision":
        """Build from HF-named tensors. Only the vision/abstractor ones are read, so a state
        holding just those is enough: the 7B decoder never has to be loaded to export the ONNX."""
        model = _build(lambda: cls(cfg, swap_sincos_halves))
        _load(model, state, _vision_hf_name)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, ckpt, swap_sincos_halves: bool = False) -> "Owl2Vision":
        cfg = ckpt.config
        return cls.from_state_dict(cfg, ckpt.load(cls.checkpoint_names(cfg)), swap_sincos_halves)


# ================================================================================================
# Decoder: LLaMA-2 with the Modality-Adaptive Module (docs/architecture.md §4)
# ================================================================================================

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalise in float32, then scale by the weight
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Multiway(nn.Module):
    """Two copies of a module, index 0 = text route, 1 = visual route; each position takes the
    copy its modality names. MAM routes per position, not per sequence."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """x [T, in], modality [T] -> [T, out]"""
        visual = modality == VISUAL_ROUTE
        if not visual.any():
            return self.multiway[TEXT_ROUTE](x)
        if visual.all():
            return self.multiway[VISUAL_ROUTE](x)
        text = self.multiway[TEXT_ROUTE](x[~visual])
        out = x.new_empty(x.shape[0], text.shape[-1])
        out[~visual] = text
        out[visual] = self.multiway[VISUAL_ROUTE](x[visual])
        return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF LLaMA rotary embedding on x [H, T, d] at `positions` [T]: dim j pairs with j + d/2
    ("rotate_half", NeoX style), not adjacent pairs. That is why the GGUF writer permutes Q/K."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # [T, d]: θ duplicated across both halves
    return x * angles.cos() + rotate_half(x) * angles.sin()


class KVCache:
    """Per-layer keys (after RoPE) and values [H_kv, T, d] of every position seen so far.

    Image positions keep the K/V computed with the visual route; a rebuild must redo them that way.
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class MamAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, kv = cfg.hidden_size, cfg.kv_width
        self.n_heads, self.n_kv_heads, self.theta = cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)  # shared
        self.k_proj = Multiway(lambda: nn.Linear(d, kv, bias=False))  # per modality
        self.v_proj = Multiway(lambda: nn.Linear(d, kv, bias=False))  # per modality
        self.o_proj = nn.Linear(d, d, bias=False)  # shared

    def forward(self, x, modality, positions, layer, cache: KVCache | None):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.n_heads, -1).transpose(0, 1)  # [H, T, d]
        k = self.k_proj(x, modality).view(t, self.n_kv_heads, -1).transpose(0, 1)
        v = self.v_proj(x, modality).view(t, self.n_kv_heads, -1).transpose(0, 1)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
        # Causal over the WHOLE mixed sequence, image positions included (docs/architecture.md §9.9).
        key_positions = torch.arange(k.shape[1])
        mask = torch.zeros(t, k.shape[1])
        mask[key_positions[None, :] > positions[:, None]] = float("-inf")
        return self.o_proj(attention(q, k, v, self.head_dim, mask).transpose(0, 1).reshape(t, -1))


class MamMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MamLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        # The visual route switches BOTH norms, not only K/V (docs/architecture.md §9.8).
        self.input_layernorm = Multiway(lambda: RMSNorm(d, eps))
        self.self_attn = MamAttention(cfg)
        self.post_attention_layernorm = Multiway(lambda: RMSNorm(d, eps))
        self.mlp = MamMLP(cfg)

    def forward(self, x, modality, positions, layer, cache):
        h = x + self.self_attn(self.input_layernorm(x, modality), modality, positions, layer, cache)
        return h + self.mlp(self.post_attention_layernorm(h, modality))


class MamDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MamLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # one final norm, not routed
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(torch.as_tensor(ids, dtype=torch.long))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def forward(self, embeds: torch.Tensor, modality: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """embeds [T, D], modality [T] -> logits [T, V]. With a cache, the T positions continue
        after the cached ones (RoPE positions and causal mask included) and are appended to it."""
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + embeds.shape[0])
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, modality, positions, i, cache)
        return self.lm_head(self.norm(x))


# ================================================================================================
# The whole model
# ================================================================================================

class Owl2Reference(nn.Module):
    def __init__(self, cfg: Owl2Config):
        super().__init__()
        self.cfg = cfg
        self.vision = Owl2Vision(cfg)
        self.decoder = MamDecoder(cfg.text)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, cfg: Owl2Config, state: Mapping[str, torch.Tensor]) -> "Owl2Reference":
        """HF-named tensors (the checkpoint's names), converted to float32."""
        model = _build(lambda: cls(cfg))
        _load(model.vision, state, _vision_hf_name)
        _load(model.decoder, state, _decoder_hf_name)
        return model.eval().requires_grad_(False)

    @staticmethod
    def checkpoint_names(cfg: Owl2Config) -> list[str]:
        return list(hf_layout.expected_shapes(cfg))

    @classmethod
    def from_checkpoint(cls, ckpt) -> "Owl2Reference":
        cfg = ckpt.config
        return cls.from_state_dict(cfg, ckpt.load(cls.checkpoint_names(cfg)))

    # -- image side ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels) -> torch.Tensor:
        """pixels [N, 3, S, S] (tensor or numpy) -> [N, n_visual, n_embd]"""
        return self.vision(torch.as_tensor(pixels, dtype=torch.float32))

    # -- splicing (docs/architecture.md §4, "Splicing") ----------------------------------------------------------

    def splice(self, ids: Sequence[int], image_embeds=None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids with one IMAGE_TOKEN_ID per image -> (embeds [T, D], modality [T] long).

        Each IMAGE_TOKEN_ID is replaced by the next image's n_visual embeddings (it is never
        embedded itself), all of them routed visual, vit_eos included (docs/architecture.md §9.7).
        """
        ids = list(ids)
        n_slots = ids.count(IMAGE_TOKEN_ID)
        n_images = 0 if image_embeds is None else len(image_embeds)
        if n_slots != n_images:
            raise ValueError(f"the prompt has {n_slots} image slot(s) but {n_images} image(s) "
                             f"were given")
        parts, routes, text_run, image_i = [], [], [], 0

        def flush_text():
            if text_run:
                parts.append(self.decoder.embed(text_run))
                routes.append(torch.full((len(text_run),), TEXT_ROUTE, dtype=torch.long))
                text_run.clear()

        for tok in ids:
            if tok != IMAGE_TOKEN_ID:
                text_run.append(tok)
                continue
            flush_text()
            image = torch.as_tensor(image_embeds[image_i], dtype=torch.float32)
            image_i += 1
            parts.append(image)
            routes.append(torch.full((image.shape[0],), VISUAL_ROUTE, dtype=torch.long))
        flush_text()
        if not parts:
            raise ValueError("empty prompt")
        return torch.cat(parts), torch.cat(routes)

    # -- decoding --------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, ids: Sequence[int], image_embeds=None,
               ignore_mam: bool = False) -> torch.Tensor:
        """Logits [T, V] of the whole spliced sequence in one pass. `ignore_mam` routes every
        position through the text weights (wrong on purpose: tests use it to show MAM matters)."""
        embeds, modality = self.splice(ids, image_embeds)
        if ignore_mam:
            modality = torch.zeros_like(modality)
        return self.decoder(embeds, modality)

    @torch.no_grad()
    def logits_cached(self, ids: Sequence[int], image_embeds=None,
                      prefill: int = 1) -> torch.Tensor:
        """The same [T, V] logits computed the way a runtime does: the first `prefill` spliced
        positions in one pass, then one position per step through the KV cache."""
        embeds, modality = self.splice(ids, image_embeds)
        cache = self.decoder.new_cache()
        out = [self.decoder(embeds[:prefill], modality[:prefill], cache)]
        for t in range(prefill, embeds.shape[0]):
            out.append(self.decoder(embeds[t:t + 1], modality[t:t + 1], cache))
        return torch.cat(out)

    @torch.no_grad()
    def greedy(self, ids: Sequence[int], image_embeds=None, max_new_tokens: int = 16,
               stop_at_eos: bool = True, ignore_mam: bool = False) -> list[int]:
        """Greedy generation through the KV cache; returns the new ids (eos included when it
        stopped on eos, as transformers' generate does). Every generated token is text (route 0)."""
        embeds, modality = self.splice(ids, image_embeds)
        if ignore_mam:
            modality = torch.zeros_like(modality)
        cache = self.decoder.new_cache()
        logits = self.decoder(embeds, modality, cache)
        new: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(torch.argmax(logits[-1]))
            new.append(tok)
            if stop_at_eos and tok == self.cfg.text.eos_token_id:
                break
            text = torch.tensor([TEXT_ROUTE])
            logits = self.decoder(self.decoder.embed([tok]), text, cache)
        return new


# ================================================================================================
# Loading HF-named tensors into the modules above
# ================================================================================================

# Module keys differ from the checkpoint's names only by these nestings, which upstream has and
# the reference flattens (applied to an Owl2Vision state-dict key).
_UPSTREAM_NESTING = (
    (re.compile(r"^vision_model\.layers\."), "vision_model.encoder.layers."),
    (re.compile(r"^visual_abstractor\.layers\.(\d+)\.(out_proj|norm2|mlp)\."),
     r"visual_abstractor.encoder.layers.\1.crossattention.output.\2."),
    (re.compile(r"^visual_abstractor\.layers\.(\d+)\."),
     r"visual_abstractor.encoder.layers.\1.crossattention."),
)


def _vision_hf_name(module_key: str) -> str:
    for pattern, replacement in _UPSTREAM_NESTING:
        if pattern.match(module_key):
            return "model." + pattern.sub(replacement, module_key, count=1)
    return "model." + module_key


def _decoder_hf_name(module_key: str) -> str:
    return hf_layout.LM_HEAD if module_key == hf_layout.LM_HEAD else "model." + module_key


def _build(make):
    """Construct a module without allocating its weights: they are assigned from the checkpoint
    (no second float32 copy of ~1.5 GB of vision weights; the sin-cos buffers are real anyway)."""
    with torch.device("meta"):
        return make()


def _load(module: nn.Module, state: Mapping[str, torch.Tensor], hf_name) -> None:
    """Assign the checkpoint tensors `module` needs, by name, as float32, checking shapes. Other
    tensors in `state` (the other parts, rotary inv_freq, stored pos-embed buffers) are ignored."""
    loaded, missing, wrong = {}, [], []
    for key, param in module.state_dict().items():
        name = hf_name(key)
        if name not in state:
            missing.append(name)
            continue
        tensor = torch.as_tensor(state[name])
        if tuple(tensor.shape) != tuple(param.shape):
            wrong.append(f"{name} {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            continue
        loaded[key] = tensor.to(torch.float32)
    if missing or wrong:
        shown = [f"missing {n}" for n in missing[:3]] + [f"wrong shape {w}" for w in wrong[:3]]
        raise CheckpointError(f"{len(missing)} tensor(s) missing and {len(wrong)} of a wrong shape "
                              f"({'; '.join(shown)})")
    module.load_state_dict(loaded, strict=True, assign=True)
