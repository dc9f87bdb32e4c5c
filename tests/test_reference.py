"""The PyTorch reference guards itself: each test checks a rule of docs/architecture.md in a way
that fails when the rule is broken (KV cache, MAM routing, sin-cos layout, fused QKV layout,
preprocessing geometry, chunk-wise tokenization)."""

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import math

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image

from owl2_edge.convert import hf_layout
from owl2_edge.convert.config import PreprocessConfig
from owl2_edge.convert.reference import (AbstractorLayer, Owl2Reference, Owl2Vision, VisionAttention,
                                         _decoder_hf_name, _vision_hf_name, abstractor_pos_tables)
from owl2_edge.convert.reference_io import clip_process, pad_to_square, preprocess, tokenize
from owl2_edge.names import IMAGE_TOKEN_ID, TEXT_ROUTE, VISUAL_ROUTE


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Owl2Reference:
    return Owl2Reference.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def sp(tiny_ckpt) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_ckpt.tokenizer_model))


@pytest.fixture(scope="module")
def pixels(tiny_ckpt) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = tiny_ckpt.config.vision.image_size
    return torch.randn(2, 3, s, s, generator=g)


@pytest.fixture(scope="module")
def image_embeds(ref, pixels) -> torch.Tensor:
    return ref.encode_images(pixels)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _prompt_ids(sp, prompt: str) -> list[int]:
    return tokenize(sp, prompt)


# --- Abstractor sin-cos tables (docs/architecture.md §3) -------------------------------------------------------------

def test_query_sincos_table_matches_hand_values(tiny_ckpt):
    a = tiny_ckpt.config.abstractor
    q_pos, _ = abstractor_pos_tables(a)
    d = a.hidden_size
    assert q_pos.shape == (a.num_queries, d)
    for n, k in ((3, 5), (7, 0), (1, d // 2 - 1)):
        omega = 10000.0 ** (-k / (d / 2))
        assert q_pos[n, k].item() == pytest.approx(math.sin(n * omega), abs=1e-6)  # sines first
        assert q_pos[n, d // 2 + k].item() == pytest.approx(math.cos(n * omega), abs=1e-6)


def test_key_sincos_table_first_half_is_column_and_cls_row_is_zero(tiny_ckpt):
    a = tiny_ckpt.config.abstractor
    _, k_pos = abstractor_pos_tables(a)
    d, g = a.hidden_size, a.grid_size
    assert k_pos.shape == (1 + g * g, d)
    assert torch.all(k_pos[0] == 0)
    quarter = d // 4  # each half is a 1-D table of width d/2: d/4 sines then d/4 cosines
    r, c, k = 1, 3, 2
    omega = 10000.0 ** (-k / quarter)
    row = k_pos[1 + r * g + c]
    assert row[k].item() == pytest.approx(math.sin(c * omega), abs=1e-6)            # column sin
    assert row[quarter + k].item() == pytest.approx(math.cos(c * omega), abs=1e-6)  # column cos
    assert row[d // 2 + k].item() == pytest.approx(math.sin(r * omega), abs=1e-6)   # row sin
    assert row[d // 2 + quarter + k].item() == pytest.approx(math.cos(r * omega), abs=1e-6)


def test_swapped_sincos_halves_change_image_embeddings(tiny_ckpt, pixels, image_embeds):
    swapped = Owl2Vision.from_checkpoint(tiny_ckpt, swap_sincos_halves=True)
    with torch.no_grad():
        wrong = swapped(pixels)
    assert _rel_diff(wrong, image_embeds) > 0.05


# --- Abstractor layer (docs/architecture.md §3) -------------------------------------------------

def _abstractor_layer_from_the_spec(layer, x, feats, q_pos, k_pos, n_heads):
    """One abstractor layer written out with plain tensor ops from docs/architecture.md §3, apart
    from the reference's modules: the oracle for docs/architecture.md §9.2, §9.3, §9.5 and §9.6."""
    def ln(t, norm, eps):
        return torch.nn.functional.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, eps)

    def heads(t):  # [N, T, D] -> [N, H, T, D/H]
        return t.unflatten(-1, (n_heads, -1)).transpose(1, 2)

    a = layer.attention
    qn = ln(x, layer.norm1, 1e-5)
    fn = ln(feats, layer.normk, 1e-5)
    kv = torch.cat([qn, fn], dim=1)                        # the queries are keys too
    q = heads(torch.nn.functional.linear(qn + q_pos, a.query.weight, a.query.bias))
    k = heads(torch.nn.functional.linear(kv + torch.cat([q_pos, k_pos]), a.key.weight, a.key.bias))
    v = heads(torch.nn.functional.linear(kv, a.value.weight, a.value.bias))   # no position on V
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    y = qn + layer.out_proj(attn.transpose(1, 2).flatten(2))   # residual: the normed queries
    m = layer.mlp
    h = ln(y, layer.norm2, 1e-5)
    inner = torch.nn.functional.silu(m.w1(h)) * m.w3(h)
    return y + m.w2(ln(inner, m.ffn_ln, 1e-6))             # ffn_ln inside the MLP, eps 1e-6


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: activations small enough that eps matters
def test_abstractor_layer_follows_the_spec_formula(tiny_ckpt, scale):
    cfg = tiny_ckpt.config.abstractor
    torch.manual_seed(0)
    layer = AbstractorLayer(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():  # every weight and bias random, LayerNorm affines included
            p.copy_(torch.randn_like(p) * 0.3)
    n_keys = 1 + cfg.grid_size ** 2
    x = torch.randn(2, cfg.num_queries, cfg.hidden_size, dtype=torch.float64) * scale
    feats = torch.randn(2, n_keys, cfg.encoder_hidden_size, dtype=torch.float64) * scale
    q_pos = torch.randn(cfg.num_queries, cfg.hidden_size, dtype=torch.float64) * scale
    k_pos = torch.randn(n_keys, cfg.hidden_size, dtype=torch.float64) * scale
    with torch.no_grad():
        got = layer(x, feats, q_pos, k_pos)
        want = _abstractor_layer_from_the_spec(layer, x, feats, q_pos, k_pos, cfg.num_heads)
    # The reference takes its softmax in float32 (as upstream): agreement to ~1e-5, while each rule
    # broken (eps 1e-6 for 1e-5, the residual from x, no queries among the keys...) moves it by O(1).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- Vision tower (docs/architecture.md §2) --------------------------------------------------------------------------

def test_vision_attention_reads_fused_qkv_per_head_interleaved(tiny_ckpt):
    """Attention computed by hand with the spec's row indices: head h's Q, K, V are rows
    h·3d + [0, d), + [d, 2d), + [2d, 3d) of the fused projection."""
    cfg = tiny_ckpt.config.vision
    attn = VisionAttention(cfg)
    name = hf_layout.vision_layer_name(0, "self_attn.")
    weights = tiny_ckpt.load([name + n for n in ("query_key_value.weight", "query_key_value.bias",
                                                  "dense.weight", "dense.bias")])
    attn.query_key_value.weight.data = weights[name + "query_key_value.weight"]
    attn.query_key_value.bias.data = weights[name + "query_key_value.bias"]
    attn.dense.weight.data = weights[name + "dense.weight"]
    attn.dense.bias.data = weights[name + "dense.bias"]
    x = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))

    w, b = attn.query_key_value.weight, attn.query_key_value.bias
    hd = cfg.hidden_size // cfg.num_heads
    heads = []
    for h in range(cfg.num_heads):
        rows = [slice(h * 3 * hd + j * hd, h * 3 * hd + (j + 1) * hd) for j in range(3)]
        q, k, v = (x[0] @ w[r].T + b[r] for r in rows)
        heads.append(torch.softmax(q @ k.T / math.sqrt(hd), dim=-1) @ v)
    expected = attn.dense(torch.cat(heads, dim=-1))
    with torch.no_grad():
        assert torch.allclose(attn(x)[0], expected, atol=1e-5)


def test_blockwise_qkv_layout_changes_vision_output(tiny_ckpt, pixels, image_embeds):
    """Reading the fused QKV as [Q;K;V] blocks is the classic bug; it must show in the output."""
    cfg = tiny_ckpt.config
    state = tiny_ckpt.load(Owl2Vision.checkpoint_names(cfg))
    d, heads = cfg.vision.hidden_size, cfg.vision.num_heads
    hd = d // heads
    for i in range(cfg.vision.num_layers):
        for suffix in ("weight", "bias"):
            name = hf_layout.vision_layer_name(i, f"self_attn.query_key_value.{suffix}")
            t = state[name]
            # What a blocks-reading implementation takes as head h's Q/K/V, rearranged so that
            # the (correct) interleaved reader sees exactly that.
            blocks = t.reshape(3, heads, hd, *t.shape[1:])
            state[name] = blocks.transpose(0, 1).reshape(t.shape)
    wrong = Owl2Vision.from_state_dict(cfg, state)
    with torch.no_grad():
        assert _rel_diff(wrong(pixels), image_embeds) > 0.05


def test_vision_builds_from_vision_tensors_only(tiny_ckpt, pixels, image_embeds):
    cfg = tiny_ckpt.config
    names = Owl2Vision.checkpoint_names(cfg)
    assert not any(n.startswith("model.layers.") or n == hf_layout.LM_HEAD for n in names)
    vision = Owl2Vision.from_state_dict(cfg, tiny_ckpt.load(names))
    with torch.no_grad():
        out = vision(pixels)
    assert out.shape == (2, cfg.n_visual, cfg.text.hidden_size)
    assert torch.equal(out, image_embeds)


def test_module_names_map_onto_the_release_names(ref, tiny_ckpt):
    """Every tensor of the release is used by the reference and nothing else is expected."""
    cfg = tiny_ckpt.config
    mapped = ({_vision_hf_name(k) for k in ref.vision.state_dict()}
              | {_decoder_hf_name(k) for k in ref.decoder.state_dict()})
    assert mapped == set(hf_layout.expected_shapes(cfg))


def test_vit_eos_is_the_last_image_embedding(ref, tiny_ckpt, image_embeds):
    vit_eos = tiny_ckpt.load([hf_layout.ABSTRACTOR_PREFIX + "vit_eos"])
    eos = next(iter(vit_eos.values())).reshape(-1)
    assert torch.equal(image_embeds[0, -1], eos)
    assert torch.equal(image_embeds[1, -1], eos)


# --- Splice and decoder (docs/architecture.md §4) --------------------------------------------------------------------

def test_splice_routes_every_image_embedding_visual(ref, image_embeds):
    n_vis = ref.cfg.n_visual
    ids = [1, 10, IMAGE_TOKEN_ID, 11, 12, IMAGE_TOKEN_ID, 13]
    embeds, modality = ref.splice(ids, image_embeds)
    assert embeds.shape == (5 + 2 * n_vis, ref.cfg.text.hidden_size)
    expected = [TEXT_ROUTE] * 2 + [VISUAL_ROUTE] * n_vis + [TEXT_ROUTE] * 2 \
        + [VISUAL_ROUTE] * n_vis + [TEXT_ROUTE]
    assert modality.tolist() == expected
    assert torch.equal(embeds[2:2 + n_vis], image_embeds[0])
    assert torch.equal(embeds[4 + n_vis:4 + 2 * n_vis], image_embeds[1])
    assert torch.equal(embeds[-1], ref.decoder.embed([13])[0])


def test_splice_refuses_image_count_mismatch(ref, image_embeds):
    with pytest.raises(ValueError, match="1 image slot"):
        ref.splice([1, IMAGE_TOKEN_ID, 5], image_embeds)


@pytest.mark.parametrize("prefill", [1, 4, 9])
def test_kv_cached_decode_matches_full_sequence(ref, sp, image_embeds, prefill):
    ids = _prompt_ids(sp, "USER: <|image|>Describe the image. ASSISTANT:")
    full = ref.logits(ids, image_embeds[:1])
    cached = ref.logits_cached(ids, image_embeds[:1], prefill=prefill)
    assert cached.shape == full.shape
    assert _rel_diff(cached, full) < 1e-5


def test_ignore_mam_changes_nothing_for_a_text_only_prompt(ref, sp):
    ids = _prompt_ids(sp, "USER: What is the capital of France? ASSISTANT:")
    assert torch.equal(ref.logits(ids, ignore_mam=True), ref.logits(ids))


def test_ignore_mam_changes_image_prompt_logits(ref, sp, image_embeds):
    ids = _prompt_ids(sp, "USER: <|image|>Describe the image. ASSISTANT:")
    before = ids.index(IMAGE_TOKEN_ID)
    routed, text_only = ref.logits(ids, image_embeds[:1]), ref.logits(ids, image_embeds[:1],
                                                                       ignore_mam=True)
    # Causal: positions before the image cannot see it; everything from the image on must move.
    assert torch.equal(routed[:before], text_only[:before])
    assert _rel_diff(text_only[before:], routed[before:]) > 0.05
    assert _rel_diff(text_only[-1:], routed[-1:]) > 0.05


def test_greedy_follows_the_argmax_of_full_sequence_logits(ref, sp, image_embeds):
    ids = _prompt_ids(sp, "USER: <|image|>What is this? ASSISTANT:")
    new = ref.greedy(ids, image_embeds[1:], max_new_tokens=6, stop_at_eos=False)
    assert len(new) == 6
    logits = ref.logits(ids + new, image_embeds[1:])
    n_prompt = logits.shape[0] - len(new)
    assert logits[n_prompt - 1:-1].argmax(-1).tolist() == new


def test_greedy_stops_at_eos(ref, sp, monkeypatch):
    eos = ref.cfg.text.eos_token_id
    bias = torch.zeros(ref.cfg.text.vocab_size)
    bias[eos] = 1e4  # make eos the argmax after the prompt
    lm_head = ref.decoder.lm_head
    monkeypatch.setattr(lm_head, "forward", lambda x: x @ lm_head.weight.T + bias)
    assert ref.greedy(_prompt_ids(sp, "USER: Hi ASSISTANT:"), max_new_tokens=5) == [eos]


# --- Image preprocessing (docs/architecture.md §6) -------------------------------------------------------------------

def _normalised(rgb, cfg: PreprocessConfig) -> np.ndarray:
    return ((np.asarray(rgb, np.float64) / 255 - cfg.image_mean) / cfg.image_std).astype(np.float32)


def test_pad_centres_the_image_with_the_mean_colour():
    img = Image.new("RGB", (7, 4), (200, 10, 30))
    square = pad_to_square(img, (122, 116, 104))
    assert square.size == (7, 7)
    arr = np.asarray(square)
    offset = (7 - 4) // 2  # 1 row above, 2 below
    assert (arr[:offset] == (122, 116, 104)).all() and (arr[offset + 4:] == (122, 116, 104)).all()
    assert (arr[offset:offset + 4] == (200, 10, 30)).all()


def test_release_pad_colour_is_truncated_mean():
    assert PreprocessConfig().pad_color == (122, 116, 104)


def test_preprocess_pad_keeps_geometry_at_canvas_size():
    # With S equal to the canvas side every resize is the identity, so pixels are exact.
    cfg = PreprocessConfig(image_size=7)
    img = Image.new("RGB", (4, 7), (255, 255, 255))  # tall: padding goes left/right
    px = preprocess(img, cfg, "pad")
    assert px.shape == (3, 7, 7) and px.dtype == np.float32
    pad, white = _normalised(cfg.pad_color, cfg), _normalised((255, 255, 255), cfg)
    assert np.allclose(px[:, :, 0], pad[:, None], atol=1e-6)       # offset (7-4)//2 = 1 column
    assert np.allclose(px[:, :, 5:], pad[:, None, None], atol=1e-6)
    assert np.allclose(px[:, :, 1:5], white[:, None, None], atol=1e-6)


def test_preprocess_resize_stretches_without_padding():
    cfg = PreprocessConfig(image_size=8)
    img = Image.new("RGB", (8, 4), (255, 0, 0))
    img.paste((0, 0, 255), (0, 2, 8, 4))  # bottom half blue
    px = preprocess(img, cfg, "resize")
    assert px.shape == (3, 8, 8)
    red, blue = _normalised((255, 0, 0), cfg), _normalised((0, 0, 255), cfg)
    assert np.allclose(px[:, :2], red[:, None, None], atol=1e-6)  # stretched 2x vertically
    assert np.allclose(px[:, -2:], blue[:, None, None], atol=1e-6)


def test_preprocess_crop_takes_the_centre_of_the_shortest_edge_resize():
    cfg = PreprocessConfig(image_size=7)
    cols = np.tile(np.arange(14, dtype=np.uint8)[None, :, None] * 15, (7, 1, 3))
    px = preprocess(Image.fromarray(cols), cfg, "crop")  # 14x7: short edge already 7
    assert px.shape == (3, 7, 7)
    left = (14 - 7) // 2
    assert np.allclose(px, _normalised(cols[:, left:left + 7], cfg).transpose(2, 0, 1), atol=1e-6)


def test_clip_resize_floors_the_long_edge():
    cfg = PreprocessConfig(image_size=5)
    img = Image.new("RGB", (10, 7), (0, 0, 0))  # long edge int(5*10/7) = 7, then crop to 5
    assert clip_process(img, cfg).shape == (3, 5, 5)
    assert preprocess(Image.new("L", (3, 9)), cfg, "pad").shape == (3, 5, 5)  # grey -> RGB


def test_preprocess_modes_differ_on_a_non_square_image(tiny_ckpt):
    cfg = tiny_ckpt.config.preprocess
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (30, 70, 3), dtype=np.uint8))
    pad, resize, crop = (preprocess(img, cfg, m) for m in ("pad", "resize", "crop"))
    assert not np.allclose(pad, resize) and not np.allclose(pad, crop)
    assert not np.allclose(resize, crop)
    with pytest.raises(ValueError, match="aspect mode"):
        preprocess(img, cfg, "stretch")


# --- Tokenization (docs/architecture.md §7) --------------------------------------------------------------------------

def _pieces(sp, ids):
    return [i if i == IMAGE_TOKEN_ID else sp.id_to_piece(i) for i in ids]


def test_tokenize_gives_the_chunkwise_dummy_prefixes_around_an_image(sp):
    ids = tokenize(sp, "USER: <|image|>Describe")
    pieces = _pieces(sp, ids)
    slot = ids.index(IMAGE_TOKEN_ID)
    assert ids[0] == 1 and ids.count(1) == 1
    assert pieces[slot - 2:slot + 1] == [":", "▁", IMAGE_TOKEN_ID]
    assert ids[1:slot] == sp.encode("USER: ")
    assert ids[slot + 1:] == sp.encode("Describe")  # encoded on its own: dummy "▁" prefix
    assert pieces[slot + 1].startswith("▁")
    # Whole-string tokenization (a naive implementation) has no standalone "▁" before the image.
    assert [i for i in ids if i != IMAGE_TOKEN_ID] != [1] + sp.encode("USER: Describe")


def test_tokenize_turns_a_literal_eos_into_id_2_and_restarts_the_segment(sp):
    ids = tokenize(sp, "USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:")
    eos = ids.index(2)
    assert ids[:eos] == [1] + sp.encode("USER: Hi ASSISTANT: Hello.")
    assert ids[eos + 1:] == sp.encode("USER: Bye ASSISTANT:")
    assert sp.id_to_piece(ids[eos + 1]).startswith("▁")


def test_tokenize_adjacent_images_give_adjacent_slots(sp):
    ids = tokenize(sp, "USER: <|image|><|image|>Compare ASSISTANT:")
    slot = ids.index(IMAGE_TOKEN_ID)
    assert ids[slot:slot + 2] == [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]
    assert ids.count(1) == 1 and ids[0] == 1


def test_tokenize_prompt_starting_with_the_image_puts_bos_after_it(sp):
    assert tokenize(sp, "<|image|>Hi") == [IMAGE_TOKEN_ID, 1] + sp.encode("Hi")
    assert tokenize(sp, "<|image|>") == [IMAGE_TOKEN_ID]
    assert tokenize(sp, "Hi<|image|>") == [1] + sp.encode("Hi") + [IMAGE_TOKEN_ID]


def test_tokenize_text_only_is_plain_sentencepiece_with_bos(sp):
    prompt = "USER: What is the capital of France? ASSISTANT:"
    assert tokenize(sp, prompt) == [1] + sp.encode(prompt)
