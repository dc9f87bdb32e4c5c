"""The decoder GGUF pair: a stock llama.cpp base with the text route, a sidecar with the visual
route. Checked against the PyTorch reference on the project's tiny checkpoint."""

from __future__ import annotations

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import gguf
import numpy as np
import sentencepiece as spm
import torch

from owl2_edge import _decoder, gguf_names, names
from owl2_edge.tools import llama_stock
from owl2_edge.convert import hf_layout
from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.gguf_pair import (QUANT_TYPES, check_quant, gguf_to_hf_rope_rows,
                                         hf_to_gguf_rope_rows, write_gguf_pair)
from owl2_edge.quant import read_tensor_types
from owl2_edge.convert.reference import Owl2Reference
from owl2_edge.convert.reference_io import tokenize
from owl2_edge.convert.tiny import make_tiny_checkpoint, tiny_config

llama_cpp = pytest.importorskip("llama_cpp")

GGML_F32 = 0
TEXT_PROMPTS = (
    "USER: What is the capital of France? ASSISTANT:",
    "The cat sat on the red sofa, 12345 café 你好.",
    "a",
)
IMAGE_PROMPT = "USER: <|image|>Describe the image. ASSISTANT:"

# Largest |llama.cpp - reference| over all positions and vocabulary entries of TEXT_PROMPTS on the
# tiny checkpoint (logits of order 4). Measured: F32 1.9e-6; F16 2.0e-3 and BF16 1.6e-2 (the
# weights are exact, llama.cpp rounds the activations to the weight type for the matmuls); Q8_0
# 0.071 (weights and activations both in 8-bit blocks). Bounds keep a margin of 3x or more.
LOGIT_BOUNDS = {"F32": 1e-4, "F16": 0.01, "BF16": 0.05, "Q8_0": 0.2}


# --- Fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tiny_ckpt, tmp_path_factory):
    """quant -> (base, sidecar) paths of the tiny checkpoint, each converted once per module."""
    made: dict[str, tuple] = {}

    def get(quant: str):
        if quant not in made:
            made[quant] = write_gguf_pair(tiny_ckpt, tmp_path_factory.mktemp(f"pair-{quant}"),
                                          quant, pair_id=f"tiny-{quant}")
        return made[quant]
    return get


@pytest.fixture(scope="module")
def ckpt_256(tmp_path_factory) -> Checkpoint:
    """A tiny checkpoint whose rows are 256 wide: K-quants apply without llama.cpp's fallbacks."""
    cfg = tiny_config(text={"hidden_size": 256, "intermediate_size": 512})
    return Checkpoint.open(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-256"), config=cfg,
                                                seed=1))


@pytest.fixture(scope="module")
def state(tiny_ckpt) -> dict[str, torch.Tensor]:
    return tiny_ckpt.load(Owl2Reference.checkpoint_names(tiny_ckpt.config))


@pytest.fixture(scope="module")
def reference(tiny_ckpt, state) -> Owl2Reference:
    return Owl2Reference.from_state_dict(tiny_ckpt.config, state)


@pytest.fixture(scope="module")
def sp(tiny_ckpt):
    return spm.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


@pytest.fixture(scope="module")
def image_embeds(reference, tiny_ckpt):
    s = tiny_ckpt.config.vision.image_size
    pixels = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(7))
    return reference.encode_images(pixels)


# --- Helpers --------------------------------------------------------------------------------------

def gguf_values(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in PyTorch's (rows, cols) order, dequantized by ggml."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        cols = int(t.shape[0])
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1, _decoder.row_bytes(
            int(t.tensor_type), cols))
        values = _decoder.dequantize(raw, int(t.tensor_type), cols)
        out[t.name] = values.reshape(*reversed([int(d) for d in t.shape]))
    return out


def gguf_fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
            if not k.startswith("GGUF.")}


def llama_logits(base_path, ids) -> np.ndarray:
    llm = llama_stock.Llama(str(base_path), logits_all=True, type_k=GGML_F32, type_v=GGML_F32,
                          n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def route_state(state, cfg, visual: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with each layer's visual route replaced (HF names)."""
    out = dict(state)
    out.update({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in visual.items()})
    return out


def sidecar_visual_route(mam_path, cfg) -> dict[str, np.ndarray]:
    """The sidecar's tensors under the checkpoint's multiway.1 names, K rows back in HF order."""
    values = gguf_values(mam_path)
    route = {}
    for i in range(cfg.text.num_layers):
        for part in gguf_names.ROUTED_LAYER_PARTS:
            v = values[part.gguf_name(i)]
            if part.rope_heads:
                v = gguf_to_hf_rope_rows(v, cfg.text.num_kv_heads)
            route[hf_layout.multiway_name(i, part, names.VISUAL_ROUTE)] = v
    return route


def text_route_as_visual(state, cfg) -> dict[str, np.ndarray]:
    return {hf_layout.multiway_name(i, part, names.VISUAL_ROUTE):
            state[hf_layout.multiway_name(i, part, names.TEXT_ROUTE)].numpy()
            for i in range(cfg.text.num_layers) for part in gguf_names.ROUTED_LAYER_PARTS}


# --- The base: a stock llama.cpp LLaMA ------------------------------------------------------------

@pytest.mark.parametrize("quant", list(LOGIT_BOUNDS))
def test_base_text_logits_match_reference(tiny_pair, reference, sp, quant):
    base, _ = tiny_pair(quant)
    for prompt in TEXT_PROMPTS:
        ids = tokenize(sp, prompt)
        want = reference.logits(ids).numpy()
        got = llama_logits(base, ids)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= LOGIT_BOUNDS[quant], prompt


def test_q4_0_base_loads_and_runs(tiny_pair, reference, sp):
    base, _ = tiny_pair("Q4_0")
    ids = tokenize(sp, TEXT_PROMPTS[0])
    got = llama_logits(base, ids)
    want = reference.logits(ids).numpy()
    assert np.isfinite(got).all()
    # Still the same model: logits correlate strongly with the reference's (measured 0.977).
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9


def test_q4_0_is_quantized_by_llama_cpp(tiny_pair):
    base, _ = tiny_pair("Q4_0")
    types = read_tensor_types(base)
    assert types[gguf_names.blk(0, "ffn_up")] == gguf.GGMLQuantizationType.Q4_0
    assert types[gguf_names.blk(0, "attn_norm")] == gguf.GGMLQuantizationType.F32
    assert gguf_fields(base)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0


def test_base_holds_text_route_with_q_and_k_rows_permuted(tiny_pair, state, tiny_ckpt):
    cfg = tiny_ckpt.config
    base, _ = tiny_pair("F32")
    values = gguf_values(base)
    t = cfg.text
    for i in range(t.num_layers):
        def text(part):
            return state[hf_layout.multiway_name(i, part, names.TEXT_ROUTE)].numpy()
        q = state[hf_layout.decoder_layer_name(i, "self_attn.q_proj")].numpy()
        np.testing.assert_array_equal(values[gguf_names.blk(i, "attn_q")],
                                      hf_to_gguf_rope_rows(q, t.num_heads))
        np.testing.assert_array_equal(values[gguf_names.blk(i, "attn_k")],
                                      hf_to_gguf_rope_rows(text("self_attn.k_proj"), t.num_kv_heads))
        # V is not rotated: its rows stay in HF order.
        np.testing.assert_array_equal(values[gguf_names.blk(i, "attn_v")], text("self_attn.v_proj"))
        np.testing.assert_array_equal(values[gguf_names.blk(i, "attn_norm")], text("input_layernorm"))
        np.testing.assert_array_equal(values[gguf_names.blk(i, "ffn_norm")],
                                      text("post_attention_layernorm"))
    np.testing.assert_array_equal(values[gguf_names.TOKEN_EMBD], state[hf_layout.EMBED_TOKENS].numpy())
    np.testing.assert_array_equal(values[gguf_names.OUTPUT], state[hf_layout.LM_HEAD].numpy())


def test_rope_row_permutation_pairs_dim_j_with_j_plus_half():
    heads, head_dim = 3, 8
    rows = np.arange(heads * head_dim, dtype=np.float32)[:, None]
    permuted = hf_to_gguf_rope_rows(rows, heads)[:, 0]
    # llama.cpp rotates (2j, 2j+1) together; they must be HF's (j, j + d/2) of the same head.
    assert list(permuted[:head_dim]) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert list(permuted[head_dim:2 * head_dim]) == [8, 12, 9, 13, 10, 14, 11, 15]
    np.testing.assert_array_equal(gguf_to_hf_rope_rows(hf_to_gguf_rope_rows(rows, heads), heads),
                                  rows)


def test_base_metadata_is_stock_llama(tiny_pair, tiny_ckpt):
    base, mam = tiny_pair("Q8_0")
    t = tiny_ckpt.config.text
    f = gguf_fields(base)
    assert f[gguf_names.KEY_ARCHITECTURE] == "llama"
    assert f["llama.context_length"] == t.max_position_embeddings
    assert f["llama.embedding_length"] == t.hidden_size
    assert f["llama.block_count"] == t.num_layers
    assert f["llama.feed_forward_length"] == t.intermediate_size
    assert f["llama.attention.head_count"] == t.num_heads
    assert f["llama.attention.head_count_kv"] == t.num_kv_heads
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(t.rms_norm_eps)
    assert f["llama.rope.freq_base"] == pytest.approx(t.rope_theta)
    assert f["llama.rope.dimension_count"] == t.head_dim
    assert f["tokenizer.ggml.model"] == "llama"
    assert len(f["tokenizer.ggml.tokens"]) == t.vocab_size
    assert f["tokenizer.ggml.bos_token_id"] == t.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == t.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # The base has no MAM tensors beyond llama's own: only llama.cpp names.
    assert set(read_tensor_types(base)) == {
        gguf_names.TOKEN_EMBD, gguf_names.OUTPUT_NORM, gguf_names.OUTPUT,
        *(p.gguf_name(i) for i in range(t.num_layers) for p in gguf_names.LAYER_PARTS)}


def test_token_types_follow_the_sentencepiece_model(tiny_pair, sp):
    base, _ = tiny_pair("F32")
    types = gguf_fields(base)[gguf.Keys.Tokenizer.TOKEN_TYPE]
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN
    assert types[sp.bos_id()] == types[sp.eos_id()] == gguf.TokenType.CONTROL
    byte_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(types[i] == gguf.TokenType.BYTE for i in byte_ids)
    assert types[sp.piece_to_id("▁")] == gguf.TokenType.NORMAL


# --- The sidecar: the visual route ----------------------------------------------------------------

def test_pair_ids_and_sidecar_metadata(tiny_pair, tiny_ckpt):
    base, mam = tiny_pair("Q8_0")
    t = tiny_ckpt.config.text
    fb, fm = gguf_fields(base), gguf_fields(mam)
    assert fb[gguf_names.KEY_PAIR_ID] == fm[gguf_names.KEY_PAIR_ID] == "tiny-Q8_0"
    assert fm[gguf_names.KEY_ARCHITECTURE] == gguf_names.ARCHITECTURE
    assert fm[gguf_names.KEY_GENERAL_TYPE] == gguf_names.ADAPTER_GENERAL_TYPE
    assert fm[gguf_names.KEY_ADAPTER_TYPE] == gguf_names.MAM_ADAPTER_TYPE
    assert fm[gguf_names.KEY_MAM_BLOCK_COUNT] == t.num_layers
    assert fm[gguf_names.KEY_MAM_EMBEDDING_LENGTH] == t.hidden_size
    assert fm[gguf_names.KEY_MAM_KV_WIDTH] == t.kv_width
    assert set(read_tensor_types(mam)) == {p.gguf_name(i) for i in range(t.num_layers)
                                           for p in gguf_names.ROUTED_LAYER_PARTS}


# Q8_0 measured: 0.002 off the checkpoint's visual route; the text route differs by > 0.1.
@pytest.mark.parametrize("quant, tolerance", [("F32", 0.0), ("Q8_0", 0.01)])
def test_sidecar_holds_the_visual_route_not_the_text_route(tiny_pair, state, tiny_ckpt,
                                                           quant, tolerance):
    cfg = tiny_ckpt.config
    _, mam = tiny_pair(quant)
    for name, got in sidecar_visual_route(mam, cfg).items():
        visual = state[name].numpy()
        text = state[name.replace(".multiway.1.", ".multiway.0.")].numpy()
        assert np.abs(got - visual).max() <= tolerance, name
        assert np.abs(got - text).max() > 0.1, name


def test_sidecar_norms_stay_f32(tiny_pair):
    _, mam = tiny_pair("Q4_0")
    types = read_tensor_types(mam)
    for name, ggml_type in types.items():
        if name.endswith(("attn_norm.weight", "ffn_norm.weight")):
            assert ggml_type == gguf.GGMLQuantizationType.F32, name
        else:
            assert ggml_type == gguf.GGMLQuantizationType.Q4_0, name


# Measured: the sidecar's route moves the image-prompt logits by 0 (F32) / 0.013 (Q8_0); the text
# route in its place moves them by 3.7.
@pytest.mark.parametrize("quant, image_tolerance", [("F32", 1e-5), ("Q8_0", 0.05)])
def test_sidecar_visual_route_reproduces_image_logits(tiny_pair, state, tiny_ckpt, reference, sp,
                                                      image_embeds, quant, image_tolerance):
    cfg = tiny_ckpt.config
    _, mam = tiny_pair(quant)
    ids = tokenize(sp, IMAGE_PROMPT)
    want = reference.logits(ids, image_embeds)

    from_sidecar = Owl2Reference.from_state_dict(
        cfg, route_state(state, cfg, sidecar_visual_route(mam, cfg)))
    got = from_sidecar.logits(ids, image_embeds)
    text_in_its_place = Owl2Reference.from_state_dict(
        cfg, route_state(state, cfg, text_route_as_visual(state, cfg)))
    wrong = text_in_its_place.logits(ids, image_embeds)

    sidecar_error = (got - want).abs().max().item()
    text_route_error = (wrong - want).abs().max().item()
    assert sidecar_error <= image_tolerance
    assert text_route_error > 1.0
    assert text_route_error > 10 * sidecar_error


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0", "Q6_K"])
def test_sidecar_kv_types_follow_the_base_layer_by_layer(tiny_pair, quant):
    base, mam = tiny_pair(quant)
    base_types, mam_types = read_tensor_types(base), read_tensor_types(mam)
    for name, ggml_type in mam_types.items():
        if name.endswith(("attn_k.weight", "attn_v.weight")):
            assert ggml_type == base_types[name], name


def test_k_quant_mix_raises_one_layers_v_and_the_sidecar_follows(ckpt_256, tmp_path):
    """With 256-wide rows Q4_K_M is a real mix: llama.cpp gives the last layer's attn_v Q6_K (of
    two layers) and the rest Q4_K. At the default tiny width (64) llama.cpp falls back to Q5_0 /
    Q8_0 instead; either way the sidecar mirrors the base."""
    base, mam = write_gguf_pair(ckpt_256, tmp_path, "Q4_K_M", pair_id="k")
    base_types, mam_types = read_tensor_types(base), read_tensor_types(mam)
    T = gguf.GGMLQuantizationType
    assert base_types[gguf_names.blk(0, "attn_v")] == T.Q4_K
    assert base_types[gguf_names.blk(1, "attn_v")] == T.Q6_K
    for i in range(ckpt_256.config.text.num_layers):
        for part in ("attn_k", "attn_v"):
            assert mam_types[gguf_names.blk(i, part)] == base_types[gguf_names.blk(i, part)]


def test_sidecar_quantization_is_llama_cpps(ckpt_256, tmp_path):
    """The sidecar goes through ggml's quantizer like llama.cpp's: the text-route K quantized the
    sidecar's way is byte for byte the base's attn_k."""
    base, _ = write_gguf_pair(ckpt_256, tmp_path, "Q4_K_M", pair_id="k")
    cfg = ckpt_256.config
    reader = {t.name: t for t in gguf.GGUFReader(base).tensors}
    for i in range(cfg.text.num_layers):
        k_text = ckpt_256.load([hf_layout.multiway_name(i, "self_attn.k_proj", 0)])
        values = hf_to_gguf_rope_rows(next(iter(k_text.values())).numpy(), cfg.text.num_kv_heads)
        t = reader[gguf_names.blk(i, "attn_k")]
        ours = _decoder.quantize(np.ascontiguousarray(values), int(t.tensor_type))
        np.testing.assert_array_equal(ours.ravel(), np.asarray(t.data).view(np.uint8).ravel())


# --- Names, errors, files -------------------------------------------------------------------------

def test_unknown_quant_is_refused_with_the_accepted_names(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="Q4_K_M") as e:
        write_gguf_pair(tiny_ckpt, tmp_path, "Q4_K_Z", pair_id="x")
    assert "Q4_K_Z" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_quant_names_are_case_insensitive_and_canonical():
    assert check_quant("q4_k_m") == "Q4_K_M"
    assert check_quant("bf16") == "BF16"
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K"} <= set(QUANT_TYPES)


def test_files_are_named_after_the_quant_and_temporaries_are_gone(tiny_pair):
    base, mam = tiny_pair("Q4_0")
    assert base.name == names.base_gguf_file("Q4_0")
    assert mam.name == names.mam_gguf_file("Q4_0")
    assert sorted(p.name for p in base.parent.iterdir()) == sorted([base.name, mam.name])


def test_failed_quantization_leaves_no_files(tiny_ckpt, tmp_path, monkeypatch):
    from owl2_edge import quant
    from owl2_edge.errors import Owl2Error

    def fail(src, dst, qt, importance=None, allow_requantize=False):
        raise Owl2Error("llama.cpp could not quantize the decoder")

    monkeypatch.setattr(quant, "llama_quantize", fail)
    with pytest.raises(Owl2Error):
        write_gguf_pair(tiny_ckpt, tmp_path, "Q4_0", pair_id="x")
    assert list(tmp_path.iterdir()) == []


def test_progress_counts_up_to_its_total(tiny_ckpt, tmp_path):
    calls = []
    write_gguf_pair(tiny_ckpt, tmp_path, "Q8_0", pair_id="x",
                    progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert all(t == total for _, t in calls)
