"""The native MAM decoder (cpp_ext/, owl2_edge.decoder) against the PyTorch reference on the tiny
checkpoint: logits of spliced image prompts run by run, KV-cached decode, greedy tokens, the
visual route, cache rewind/snapshots, stock llama.cpp on the same base file, quantized pairs,
KV types / flash attention, and bad files or input."""

from __future__ import annotations

import pytest

# Everything here compares with the converter's output or the PyTorch reference.
pytest.importorskip("torch", reason="needs the converter (pip install 'owl2-edge[convert]')")

import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from owl2_edge import _decoder, gguf_names, names
from owl2_edge.tools import llama_stock
from owl2_edge.convert.checkpoint import Checkpoint
from owl2_edge.convert.gguf_pair import write_gguf_pair
from owl2_edge.convert.reference import Owl2Reference
from owl2_edge.convert.tiny import make_tiny_checkpoint, tiny_config
from owl2_edge.decoder import Decoder
from owl2_edge.errors import ArgumentError, ContextFullError, DecoderError

IMG = names.IMAGE_TOKEN_ID
EOS = 2
F32_TOL = 1e-4        # max abs logit difference, F32 pair with an f32 KV cache
LLAMA_CPP_TOL = 1e-3  # against stock llama.cpp on the same base file
# Mean KL(F32 pair || quantized pair) of the next-token distributions of every position of the
# prompts below. Measured on the tiny checkpoint (seed 0): Q8_0 1.2e-4, Q4_0 1.3e-2 (random tiny
# weights quantize worse than trained ones); bounds ~4x that.
KL_BOUND = {"Q8_0": 5e-4, "Q4_0": 5e-2}

# Prompts as upstream's tokenizer_image_token returns them: ids with one IMG per image.
PROMPTS = {
    "text_only": ([1, 319, 3148, 1001, 29901, 22, 77, 400, 17], 0),
    "one_image": ([1, 3148, 1001, 29901, IMG, 5, 88, 201, 13, 319], 1),
    "image_first": ([IMG, 40, 41, 42, 43], 1),
    "image_mid_prompt": ([1, 30, 31, 32, 33, 34, IMG, 40, 41, 42, 43, 44], 1),
    "two_images": ([1, 5, IMG, 6, 7, IMG, 8, 9, 10], 2),
    # USER: <image> q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:
    "multi_turn": ([1, 11, 12, IMG, 13, 14, 15, 16, 17, EOS, 11, 12, 18, 19, 15, 16], 1),
}


def _ids(prompt: list[int], vocab: int) -> list[int]:
    """The tiny vocabulary is small: fold made-up ids into it (keeping IMG, bos and eos)."""
    return [t if t in (IMG, 1, EOS) else 3 + t % (vocab - 3) for t in prompt]


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> Owl2Reference:
    return Owl2Reference.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def pairs(tiny_ckpt, tmp_path_factory):
    """quant -> (base_path, mam_path), written lazily by the project's GGUF writer."""
    root = tmp_path_factory.mktemp("decoder-pairs")
    cache = {}

    def get(quant: str, pair_id: str = "tiny-pair"):
        key = (quant, pair_id)
        if key not in cache:
            cache[key] = write_gguf_pair(tiny_ckpt, root / f"{quant}-{pair_id}", quant, pair_id)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def images(ref) -> np.ndarray:
    """Two images' embeddings [2, n_visual, n_embd] from the reference vision side."""
    size = ref.cfg.preprocess.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return ref.encode_images(pixels).numpy()


def prompt(name: str, ref, images):
    ids, n_images = PROMPTS[name]
    return _ids(ids, ref.cfg.text.vocab_size), images[:n_images]


def runs(ids, image_embeds):
    """Split a prompt into runs of one modality, in order: ("text", ids) / ("image", embeds)."""
    out, text, k = [], [], 0
    for t in ids:
        if t != IMG:
            text.append(t)
            continue
        if text:
            out.append(("text", text))
            text = []
        out.append(("image", image_embeds[k]))
        k += 1
    if text:
        out.append(("text", text))
    return out


def feed(dec: Decoder, ids, image_embeds, all_logits=True, image_route=names.VISUAL_ROUTE):
    """Evaluate a prompt run by run; logits [T, V] of every spliced position (or the last row)."""
    rows = []
    for kind, x in runs(ids, image_embeds):
        if kind == "text":
            rows.append(dec.eval_tokens(x, all_logits=True))
        else:
            rows.append(dec.eval_embeddings(x, all_logits=True, route=image_route))
    logits = np.concatenate(rows)
    return logits if all_logits else logits[-1]


def open_decoder(pair, **kw) -> Decoder:
    kw.setdefault("n_ctx", 256)
    kw.setdefault("kv_type", "f32")
    kw.setdefault("device", "cpu")
    return Decoder(*pair, **kw)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# --- the one table of names ----------------------------------------------------------------------

def test_the_extension_was_built_from_the_current_names_tables():
    """The decoder's names come from a header generated from names.py and gguf_names.py at build
    time; an extension built before a change to them must be rebuilt, not trusted."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cpp_ext"))
    try:
        from gen_names_header import header_digest
    finally:
        sys.path.pop(0)
    assert _decoder.names_digest() == header_digest()


# --- F32 pair against the reference --------------------------------------------------------------

@pytest.mark.parametrize("name", list(PROMPTS))
def test_prefill_logits_match_reference(name, ref, images, pairs):
    ids, embeds = prompt(name, ref, images)
    expected = ref.logits(ids, embeds).numpy()
    with open_decoder(pairs("F32")) as dec:
        got = feed(dec, ids, embeds)
        assert dec.n_past == expected.shape[0]
    assert got.shape == expected.shape
    assert max_diff(got, expected) <= F32_TOL


def test_last_position_logits_are_the_last_row(ref, images, pairs):
    ids, embeds = prompt("one_image", ref, images)
    expected = ref.logits(ids, embeds).numpy()[-1]
    with open_decoder(pairs("F32")) as dec:
        for kind, x in runs(ids, embeds):
            last = dec.eval_tokens(x) if kind == "text" else dec.eval_embeddings(x)
    assert last.shape == (ref.cfg.text.vocab_size,) and last.dtype == np.float32
    assert max_diff(last, expected) <= F32_TOL


@pytest.mark.parametrize("name", ["two_images", "multi_turn"])
def test_one_position_at_a_time_through_the_cache_matches_reference(name, ref, images, pairs):
    """Every position its own run (image rows too): each step attends over the cache only."""
    ids, embeds = prompt(name, ref, images)
    expected = ref.logits(ids, embeds).numpy()
    rows = []
    with open_decoder(pairs("F32")) as dec:
        for kind, x in runs(ids, embeds):
            for j in range(len(x)):
                if kind == "text":
                    rows.append(dec.eval_tokens(x[j:j + 1]))
                else:
                    rows.append(dec.eval_embeddings(x[j:j + 1]))
    assert max_diff(np.stack(rows), expected) <= F32_TOL


def test_runs_longer_than_a_ubatch_are_split(ref, images, pairs):
    ids, embeds = prompt("two_images", ref, images)
    expected = ref.logits(ids, embeds).numpy()
    with open_decoder(pairs("F32"), n_ubatch=4) as dec:
        assert max_diff(feed(dec, ids, embeds), expected) <= F32_TOL


@pytest.mark.parametrize("name", ["one_image", "text_only"])
def test_greedy_continuation_matches_reference(name, ref, images, pairs):
    ids, embeds = prompt(name, ref, images)
    expected = ref.greedy(ids, embeds, max_new_tokens=16, stop_at_eos=False)
    got = []
    with open_decoder(pairs("F32")) as dec:
        logits = feed(dec, ids, embeds, all_logits=False)
        for _ in range(16):
            got.append(int(np.argmax(logits)))
            logits = dec.eval_tokens([got[-1]])
    assert got == expected


@pytest.mark.parametrize("n_ubatch", [512, 3])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_one_pass_of_mixed_runs_matches_reference(name, n_ubatch, ref, images, pairs):
    """eval_runs: the whole spliced prompt in one pass (graphs of n_ubatch positions, a run split
    between two when it must), each run's positions on its own route."""
    ids, embeds = prompt(name, ref, images)
    expected = ref.logits(ids, embeds).numpy()
    pieces = [np.asarray(x) if kind == "image" else x for kind, x in runs(ids, embeds)]
    with open_decoder(pairs("F32"), n_ubatch=n_ubatch) as dec:
        got = dec.eval_runs(pieces, all_logits=True)
        assert dec.n_past == expected.shape[0]
        last = dec.eval_runs([[5]])
    assert max_diff(got, expected) <= F32_TOL
    assert last.shape == (ref.cfg.text.vocab_size,)


def test_mixed_runs_keep_each_runs_route(ref, images, pairs):
    """The text route on the image's positions inside a mixed pass changes the logits after it."""
    ids, embeds = prompt("one_image", ref, images)
    pieces = [np.asarray(x) if kind == "image" else x for kind, x in runs(ids, embeds)]
    routes = [names.TEXT_ROUTE if isinstance(x, list) else names.VISUAL_ROUTE for x in pieces]
    with open_decoder(pairs("F32")) as dec:
        right = dec.eval_runs(pieces, all_logits=True)
        dec.rewind(dec.n_past)
        wrong = dec.eval_runs(pieces, all_logits=True, routes=[names.TEXT_ROUTE] * len(pieces))
        dec.rewind(dec.n_past)
        again = dec.eval_runs(pieces, all_logits=True, routes=routes)
    assert max_diff(right, again) == 0
    assert max_diff(right, wrong) > 100 * F32_TOL


def _reference_states(ref, ids, embeds, layer: int) -> np.ndarray:
    """The reference's hidden states at `layer`'s input (the final norm's at n_layer)."""
    with torch.no_grad():
        x, modality = ref.splice(ids, embeds)
        positions = torch.arange(x.shape[0])
        for i, block in enumerate(ref.decoder.layers[:layer]):
            x = block(x, modality, positions, i, None)
    return x.numpy()


@pytest.mark.parametrize("n_ubatch", [512, 3])
def test_a_pass_from_a_later_layer_continues_the_reference(n_ubatch, ref, images, pairs):
    """eval_capturing gives the hidden states at each layer's input as the reference computes
    them, and eval_from_layer run from those states (each position on its route) gives the
    logits of the whole pass; from the states of one route only, they are wrong (the layers
    after still read MAM's routes)."""
    ids, embeds = prompt("multi_turn", ref, images)
    expected = ref.logits(ids, embeds).numpy()
    _, modality = ref.splice(ids, embeds)
    routes = modality.numpy()
    pieces = [np.asarray(x) if kind == "image" else x for kind, x in runs(ids, embeds)]
    n_layer = ref.cfg.text.num_layers
    layers = list(range(n_layer + 1))
    with open_decoder(pairs("F32"), n_ubatch=n_ubatch) as dec:
        whole, states = dec.eval_capturing(pieces, layers)
        assert sorted(states) == layers
        for b in layers:
            assert states[b].shape == (len(routes), ref.cfg.text.hidden_size)
            assert max_diff(states[b], _reference_states(ref, ids, embeds, b)) <= F32_TOL
            dec.clear_sequence(0)
            from_b = dec.eval_from_layer(states[b], routes, b)
            assert max_diff(from_b, whole) <= 1e-5, b
            assert max_diff(from_b, expected) <= F32_TOL
        dec.clear_sequence(0)
        all_text = dec.eval_from_layer(states[1], np.zeros_like(routes), 1)
    assert max_diff(whole, expected) <= F32_TOL
    assert max_diff(all_text, expected) > 100 * F32_TOL


def test_a_pass_from_a_later_layer_refuses_bad_input(ref, images, pairs):
    """A layer outside the model, states of another width, routes that do not match, capture
    layers out of order, token ids into a later layer: one error each, nothing kept in the
    cache, and the decoder still answers."""
    ids, embeds = prompt("one_image", ref, images)
    pieces = [np.asarray(x) if kind == "image" else x for kind, x in runs(ids, embeds)]
    n_layer, width = ref.cfg.text.num_layers, ref.cfg.text.hidden_size
    states = np.zeros((4, width), np.float32)
    with open_decoder(pairs("F32")) as dec:
        with pytest.raises(ArgumentError, match="first_layer"):
            dec.eval_from_layer(states, [0] * 4, n_layer + 1)
        with pytest.raises(DecoderError, match="embeddings must be"):
            dec.eval_from_layer(np.zeros((4, width + 1), np.float32), [0] * 4, 1)
        with pytest.raises(DecoderError, match="routes must"):
            dec.eval_from_layer(states, [0, 1, 2, 0], 1)
        with pytest.raises(DecoderError, match="routes must"):
            dec.eval_from_layer(states, [0] * 3, 1)
        # The native guards, under what the Python API checks first:
        native = dec._native.eval_runs
        ids = np.asarray(pieces[0], np.int32)
        with pytest.raises(_decoder.NativeDecoderError, match="ascend"):
            native([(ids, 0, 0)], True, 0, [1, 0])
        with pytest.raises(_decoder.NativeDecoderError, match="ascend"):
            native([(states, 0, 0)], True, 1, [0])
        with pytest.raises(_decoder.NativeDecoderError, match="not token ids"):
            native([(ids, 0, 0)], True, 1, [])
        with pytest.raises(_decoder.NativeDecoderError, match="first_layer"):
            native([(states, 0, 0)], True, -1, [])
        assert dec.n_past == 0
        assert np.isfinite(dec.eval_runs(pieces, all_logits=True)).all()


def test_text_route_on_an_image_run_breaks_the_logits(ref, images, pairs):
    """Routing the image run through the text weights is what ignoring MAM does: it must not
    pass for the right answer, and must equal the reference's ignore_mam output."""
    ids, embeds = prompt("one_image", ref, images)
    right = ref.logits(ids, embeds).numpy()
    wrong = ref.logits(ids, embeds, ignore_mam=True).numpy()
    with open_decoder(pairs("F32")) as dec:
        got = feed(dec, ids, embeds, image_route=names.TEXT_ROUTE)
    assert max_diff(got, right) > 100 * F32_TOL
    assert max_diff(got, wrong) <= F32_TOL


# --- the cache -------------------------------------------------------------------------------------

def test_rewind_then_reeval_equals_a_fresh_run(ref, images, pairs):
    ids, embeds = prompt("one_image", ref, images)
    other = [7, 8, 9, 10, 11]
    with open_decoder(pairs("F32")) as dec:
        feed(dec, ids, embeds)
        n = dec.n_past
        dec.eval_tokens(other)
        dec.rewind(len(other))
        assert dec.n_past == n
        again = dec.eval_tokens(ids[-3:], all_logits=True)
    with open_decoder(pairs("F32")) as fresh:
        feed(fresh, ids, embeds)
        expected = fresh.eval_tokens(ids[-3:], all_logits=True)
    assert max_diff(again, expected) <= 1e-6
    with pytest.raises(DecoderError, match="rewind"):
        open_decoder(pairs("F32")).rewind(1)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_saved_state_restores_the_prefix(kv_type, ref, images, pairs):
    ids, embeds = prompt("one_image", ref, images)
    q1, q2 = [20, 21, 22], [30, 31, 32, 33]
    with open_decoder(pairs("F32"), kv_type=kv_type) as dec:
        feed(dec, ids, embeds)
        state = dec.save_state()
        assert state.n_past == dec.n_past
        dec.eval_tokens(q1)
        dec.restore_state(state)
        assert dec.n_past == state.n_past
        after_restore = dec.eval_tokens(q2, all_logits=True)
    with open_decoder(pairs("F32"), kv_type=kv_type) as fresh:
        feed(fresh, ids, embeds)
        expected = fresh.eval_tokens(q2, all_logits=True)
    assert max_diff(after_restore, expected) <= 1e-6
    with open_decoder(pairs("F32"), kv_type="f16" if kv_type == "f32" else "f32") as other:
        with pytest.raises(DecoderError, match="layout"):
            other.restore_state(state)


def test_overlong_input_raises_context_full_and_leaves_the_decoder_usable(ref, images, pairs):
    ids, embeds = prompt("one_image", ref, images)
    n_visual = embeds.shape[1]
    with open_decoder(pairs("F32"), n_ctx=len(ids) + n_visual - 1) as dec:  # room for all but 1
        with pytest.raises(ContextFullError, match="positions"):
            dec.eval_tokens(list(range(3, 3 + dec.n_ctx + 1)))
        assert dec.n_past == 0
        feed(dec, ids[:-1], embeds)
        with pytest.raises(ContextFullError):
            dec.eval_tokens(ids[-1:] * 2)
        with pytest.raises(ContextFullError):
            dec.eval_embeddings(embeds[0])
        assert dec.n_past == dec.n_ctx - 1
        last = dec.eval_tokens(ids[-1:])
    assert max_diff(last, ref.logits(ids, embeds).numpy()[-1]) <= F32_TOL


def test_bad_input_raises_decoder_error(ref, images, pairs):
    ids, embeds = prompt("one_image", ref, images)
    with open_decoder(pairs("F32")) as dec:
        with pytest.raises(DecoderError, match="image slot"):
            dec.eval_tokens(ids)
        with pytest.raises(DecoderError, match="vocabulary"):
            dec.eval_tokens([1, dec.n_vocab])
        with pytest.raises(DecoderError, match="embeddings must be"):
            dec.eval_embeddings(embeds[0][:, :-1])
        with pytest.raises(DecoderError, match="route"):
            dec.eval_tokens([1], route=2)
        assert dec.n_past == 0
    with pytest.raises(DecoderError, match="closed"):
        dec.eval_tokens([1])


# --- lifetime --------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_close_from_another_thread_during_an_eval_waits_or_refuses_never_crashes(delay, ref, pairs):
    """The GIL is released while the decoder computes, so close() may come from another thread in
    the middle of an eval. The eval either finishes (close() waits for it) or, when close() got in
    first, raises DecoderError; close() returns; every later call raises DecoderError "closed"."""
    n = 1000  # one position per graph: an eval of ~0.2 s on the tiny model, long enough to close into
    dec = open_decoder(pairs("F32"), n_ctx=n, n_ubatch=1, n_threads=1)
    ids = _ids(list(range(3, 3 + n)), ref.cfg.text.vocab_size)
    eval_started = threading.Event()
    outcome = {}

    def run_eval():
        eval_started.set()
        try:
            outcome["logits"] = dec.eval_tokens(ids, all_logits=True)
        except DecoderError as e:
            outcome["error"] = e
        except BaseException as e:  # noqa: BLE001 (anything else fails the test below)
            outcome["unexpected"] = e

    def run_close():
        eval_started.wait()
        time.sleep(delay)
        dec.close()
        outcome["close_returned"] = True

    threads = [threading.Thread(target=run_eval), threading.Thread(target=run_close)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the eval or close() hung"
    assert "unexpected" not in outcome, repr(outcome.get("unexpected"))
    assert outcome.get("close_returned")
    if "logits" in outcome:
        assert outcome["logits"].shape == (n, ref.cfg.text.vocab_size)
        assert np.isfinite(outcome["logits"]).all()
    else:
        assert "closed" in str(outcome["error"])
    assert dec.closed
    for later_call in (lambda: dec.eval_tokens([1]), lambda: dec.n_past, lambda: dec.rewind(0),
                       dec.save_state, lambda: dec.n_vocab):
        with pytest.raises(DecoderError, match="closed"):
            later_call()
    dec.close()  # closing again is harmless


@pytest.mark.parametrize("quant", ["F32", "Q4_0"])
def test_a_background_load_knows_its_facts_at_once_and_evaluates_the_same(quant, ref, images, pairs):
    """background=True: the facts come from opening the pair; the first call that needs the
    weights waits for them, and gives what a decoder loaded in the foreground gives."""
    ids, embeds = prompt("image_mid_prompt", ref, images)
    with open_decoder(pairs(quant)) as dec:
        expected = feed(dec, ids, embeds)
    base, mam = pairs(quant)
    with Decoder(base, mam, n_ctx=256, kv_type="f32", device="cpu", background=True) as dec:
        assert dec.n_vocab == ref.cfg.text.vocab_size and dec.n_layer == ref.cfg.text.num_layers
        got = feed(dec, ids, embeds)
        assert dec.ready
    assert np.array_equal(got, expected)


def test_close_during_a_background_load_stops_it(pairs):
    for _ in range(5):  # closing at once, before or while the weights are placed
        dec = Decoder(*pairs("Q4_0"), n_ctx=64, device="cpu", background=True)
        dec.close()
        assert dec.closed
        with pytest.raises(DecoderError, match="closed"):
            dec.eval_tokens([1])


def test_exiting_while_the_weights_load_in_the_background_is_clean(pairs):
    """The interpreter may exit before a background load ends (an error right after load): the
    load is stopped and waited for at exit, never torn down under ggml."""
    base, mam = pairs("Q4_0")
    code = ("import sys; from owl2_edge.decoder import Decoder; "
            f"d = Decoder({str(base)!r}, {str(mam)!r}, device='cpu', background=True); "
            "sys.exit(3)")
    import subprocess
    import os
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})  # the installed owl2_edge
    assert done.returncode == 3, done.stderr
    assert done.stderr == ""


# --- stock llama.cpp and quantized pairs ---------------------------------------------------------

@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_0"])
def test_text_logits_equal_stock_llama_cpp(quant, ref, pairs):
    pytest.importorskip("llama_cpp")
    base, mam = pairs(quant)
    ids = _ids(PROMPTS["text_only"][0] + [3148, 1001, 29901, 500, 600], ref.cfg.text.vocab_size)
    f32 = 0  # GGML_TYPE_F32
    llm = llama_stock.Llama(model_path=str(base), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True,
                          type_k=f32, type_v=f32, flash_attn=False, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        stock = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    with open_decoder((base, mam)) as dec:
        ours = dec.eval_tokens(ids, all_logits=True)
    assert max_diff(ours, stock) <= LLAMA_CPP_TOL


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_quantized_pair_stays_close_to_f32(quant, ref, images, pairs):
    kl = []
    with open_decoder(pairs("F32")) as full, open_decoder(pairs(quant)) as q:
        for name in PROMPTS:
            ids, embeds = prompt(name, ref, images)
            kl.append(mean_kl(feed(full, ids, embeds), feed(q, ids, embeds)))
            full.rewind(full.n_past)
            q.rewind(q.n_past)
    assert 0 < np.mean(kl) < KL_BOUND[quant], kl


# --- KV types and flash attention ----------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_head_pair(tmp_path_factory):
    """A checkpoint with a head size of 32, which a q8_0 cache needs (whole blocks per head)."""
    root = tmp_path_factory.mktemp("wide-head")
    cfg = tiny_config(text={"num_heads": 2, "num_kv_heads": 2})
    ckpt = Checkpoint.open(make_tiny_checkpoint(root / "ckpt", config=cfg, seed=2))
    return Owl2Reference.from_checkpoint(ckpt), write_gguf_pair(ckpt, root / "pair", "F32", "wide")


# Max abs logit difference to the reference (logits up to ~4.3). Measured: f16 1.4e-3, flash
# attention 2.8e-3 (it reads K/V as f16), q8_0 3.0e-2; tolerances ~3.5x that.
@pytest.mark.parametrize("kv_type,flash_attn,tol", [
    ("f32", True, 1e-2),
    ("f16", False, 5e-3),
    ("f16", True, 1e-2),
    ("q8_0", False, 1e-1),
    ("q8_0", True, 1e-1),
])
def test_kv_types_and_flash_attention_stay_close(kv_type, flash_attn, tol, wide_head_pair):
    ref, pair = wide_head_pair
    size = ref.cfg.preprocess.image_size
    embeds = ref.encode_images(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))).numpy()
    ids = _ids(PROMPTS["two_images"][0], ref.cfg.text.vocab_size)
    expected = ref.logits(ids, embeds).numpy()
    with open_decoder(pair, kv_type=kv_type, flash_attn=flash_attn) as dec:
        assert (dec.kv_type, dec.flash_attn) == (kv_type, flash_attn)
        got = feed(dec, ids, embeds)
        # decode steps through the same cache
        steps = [dec.eval_tokens([t]) for t in (5, 6, 7)]
    assert max_diff(got, expected) <= tol
    assert mean_kl(expected, got) < 1e-4
    assert np.isfinite(steps).all()


def test_q8_0_cache_refuses_a_head_size_it_cannot_block(pairs):
    with pytest.raises(DecoderError, match="head size"):
        open_decoder(pairs("F32"), kv_type="q8_0")


# --- files -----------------------------------------------------------------------------------------

def _still_works(pair):
    with open_decoder(pair) as dec:
        assert np.isfinite(dec.eval_tokens([1, 5, 6])).all()


def test_cpu_weights_are_mapped_from_the_files_not_copied(pairs):
    base, mam = pairs("F32")

    def mapped() -> set[str]:
        with open("/proc/self/maps") as f:
            return {line.split(None, 5)[-1].strip() for line in f if len(line.split()) >= 6}
    dec = open_decoder((base, mam))
    assert {str(base), str(mam)} <= mapped()
    dec.close()
    assert not {str(base), str(mam)} & mapped()


def test_missing_files_raise_decoder_error(pairs, tmp_path):
    base, mam = pairs("F32")
    with pytest.raises(DecoderError, match="decoder GGUF .*cannot open"):
        open_decoder((tmp_path / "nope.gguf", mam))
    with pytest.raises(DecoderError, match="MAM GGUF .*cannot open"):
        open_decoder((base, tmp_path / "nope.gguf"))
    _still_works((base, mam))


def test_corrupt_file_raises_decoder_error(pairs, tmp_path):
    base, mam = pairs("F32")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecoderError, match="not a readable GGUF"):
        open_decoder((junk, mam))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(DecoderError, match="not a readable GGUF"):
        open_decoder((base, empty))
    _still_works((base, mam))


@pytest.mark.parametrize("which", ["base", "mam"])
def test_truncated_file_raises_decoder_error(which, pairs, tmp_path):
    base, mam = pairs("F32")
    src = base if which == "base" else mam
    cut = tmp_path / src.name
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) - 100])
    pair = (cut, mam) if which == "base" else (base, cut)
    with pytest.raises(DecoderError, match="truncated"):
        open_decoder(pair)
    _still_works((base, mam))


def test_sidecar_of_another_pair_is_refused(pairs):
    base, mam = pairs("F32")
    _, other_mam = pairs("F32", pair_id="another-pair")
    with pytest.raises(DecoderError, match="pair id"):
        open_decoder((base, other_mam))
    _still_works((base, mam))


def test_swapped_or_wrong_kind_of_files_are_refused(pairs, tmp_path):
    base, mam = pairs("F32")
    with pytest.raises(DecoderError, match="not an owl2 MAM sidecar"):
        open_decoder((base, base))
    with pytest.raises(DecoderError, match="missing key llama"):
        open_decoder((mam, mam))
    data = bytearray(base.read_bytes())
    # general.architecture's value follows its key: u32 type, u64 length, then the bytes.
    at = data.index(gguf_names.KEY_ARCHITECTURE.encode()) + len(gguf_names.KEY_ARCHITECTURE) + 4 + 8
    assert data[at:at + 5] == b"llama"
    data[at:at + 5] = b"gemma"
    wrong = tmp_path / "wrong-arch.gguf"
    wrong.write_bytes(bytes(data))
    with pytest.raises(DecoderError, match="architecture is 'gemma'"):
        open_decoder((wrong, mam))
    _still_works((base, mam))


def test_sidecar_of_a_different_shape_is_refused(pairs, tmp_path):
    """A sidecar whose tensors do not fit the base (here: another layer count)."""
    base, mam = pairs("F32")
    ckpt = Checkpoint.open(make_tiny_checkpoint(tmp_path / "ckpt", config=tiny_config(text={"num_layers": 3})))
    _, mam3 = write_gguf_pair(ckpt, tmp_path / "pair3", "F32", "tiny-pair")
    with pytest.raises(DecoderError, match="block_count"):
        open_decoder((base, mam3))
    _still_works((base, mam))


@pytest.mark.parametrize("option,value,message", [
    ("kv_type", "q4_0", "kv_type must be one of f16, f32, q8_0, not 'q4_0'"),
    ("device", "tpu", "device must be one of auto, cpu, cuda, not 'tpu'"),
    ("n_ctx", 2**31, "n_ctx must be between 1 and 1048576, not 2147483648"),
    ("n_ctx", "2048", "n_ctx must be an integer, not '2048'"),
    ("n_threads", 2**40, "n_threads must be between 1 and"),
    ("n_threads", 10000, "n_threads must be between 1 and"),
    ("flash_attn", "yes", "flash_attn must be True or False"),
])
def test_bad_options_raise_argument_error(option, value, message, pairs):
    with pytest.raises(ArgumentError, match=re.escape(message)):
        open_decoder(pairs("F32"), **{option: value})


# --- optional paths: repacked CPU weights, a GPU --------------------------------------------------

def test_repacked_cpu_weights_give_the_same_logits(ref, images, pairs):
    ids, embeds = prompt("two_images", ref, images)
    with open_decoder(pairs("Q4_0"), repack=False) as mapped, open_decoder(pairs("Q4_0"), repack=True) as repacked:
        assert max_diff(feed(repacked, ids, embeds), feed(mapped, ids, embeds)) <= 1e-3


def _gpu_decoder(pair, **kw) -> Decoder:
    try:
        return open_decoder(pair, device="cuda", **kw)
    except DecoderError as e:
        if "no GPU device" in str(e):
            pytest.skip("the installed ggml has no GPU device")
        raise


def _matrices_of(pair) -> dict:
    """Every weight matrix of a pair as Decoder.override_weights takes it: {(name, the sidecar's):
    (type, bytes)}."""
    import gguf
    out = {}
    for path, visual in ((pair[0], False), (pair[1], True)):
        for t in gguf.GGUFReader(path).tensors:
            if len(t.shape) == 2:
                out[(t.name, visual)] = (int(t.tensor_type),
                                         np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
    return out


@pytest.mark.parametrize("n_gpu_layers", [-1, 1])
def test_gpu_pass_from_a_later_layer_matches_the_whole_pass(n_gpu_layers, ref, images, pairs):
    """The recipe chooser's passes from a band's input (eval_capturing / eval_from_layer) where
    `--device cuda` runs them: all layers on the GPU, or split with the CPU."""
    ids, embeds = prompt("multi_turn", ref, images)
    expected = ref.logits(ids, embeds).numpy()
    routes = ref.splice(ids, embeds)[1].numpy()
    pieces = [np.asarray(x) if kind == "image" else x for kind, x in runs(ids, embeds)]
    layers = list(range(ref.cfg.text.num_layers + 1))
    with _gpu_decoder(pairs("F32"), n_gpu_layers=n_gpu_layers) as dec:
        whole, states = dec.eval_capturing(pieces, layers)
        for b in layers:
            dec.clear_sequence(0)
            assert max_diff(dec.eval_from_layer(states[b], routes, b), whole) <= 1e-3, b
    assert max_diff(whole, expected) <= 1e-2


@pytest.mark.parametrize("repack", [False, True])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_weights_overridden_in_memory_compute_as_the_pair_written(device, repack, ref, images, pairs):
    """Decoder.override_weights (the recipe chooser lowers a group this way, on the device the
    source runs on): the F32 pair with every matrix replaced by the Q4_0 pair's gives the Q4_0
    pair's logits, and clear_overrides gives the F32 pair's back."""
    ids, embeds = prompt("two_images", ref, images)
    opened = ((lambda pair: _gpu_decoder(pair, repack=repack)) if device == "cuda"
              else (lambda pair: open_decoder(pair, repack=repack)))
    with opened(pairs("Q4_0")) as q4:
        want_q4 = feed(q4, ids, embeds)
    with opened(pairs("F32")) as dec:
        want_f32 = feed(dec, ids, embeds)
        matrices = _matrices_of(pairs("Q4_0"))
        assert any(visual for _, visual in matrices)
        dec.override_weights(matrices)
        assert dec._native.n_overrides == len(matrices)
        dec.clear_sequence(0)
        got_q4 = feed(dec, ids, embeds)
        dec.clear_overrides()
        assert dec._native.n_overrides == 0
        dec.clear_sequence(0)
        got_f32 = feed(dec, ids, embeds)
    assert max_diff(got_q4, want_q4) <= 1e-4
    assert max_diff(want_q4, want_f32) > 1e-3  # the replacement was not a no-op
    assert max_diff(got_f32, want_f32) <= 1e-6


@pytest.mark.parametrize("n_gpu_layers", [-1, 1])
@pytest.mark.parametrize("flash_attn", [False, True])
def test_gpu_offload_matches_reference(n_gpu_layers, flash_attn, ref, images, pairs):
    ids, embeds = prompt("multi_turn", ref, images)
    expected = ref.logits(ids, embeds).numpy()
    with _gpu_decoder(pairs("F32"), n_gpu_layers=n_gpu_layers, flash_attn=flash_attn) as dec:
        assert dec.device != "CPU"
        dec_flash = dec.flash_attn
        got = feed(dec, ids, embeds)
        steps = [dec.eval_tokens([t]) for t in (5, 6)]
    # On the GPU attention always runs ggml's fused kernel, with K/V in f16 (the decoder forces
    # it there), so both cases meet the fused kernel's tolerance.
    assert dec_flash
    assert max_diff(got, expected) <= 1e-2
    assert np.isfinite(steps).all()


@pytest.mark.parametrize("quant", ["F32", "Q4_0"])
def test_gpu_text_logits_equal_stock_llama_cpp_on_the_gpu(quant, ref, pairs):
    pytest.importorskip("llama_cpp")
    base, mam = pairs(quant)
    ids = _ids(PROMPTS["text_only"][0] + [3148, 1001, 29901, 500, 600], ref.cfg.text.vocab_size)
    with _gpu_decoder((base, mam), kv_type="f16") as dec:
        ours = dec.eval_tokens(ids, all_logits=True)
    f16 = 1  # GGML_TYPE_F16: the cache both engines' fused attention kernels read on the GPU
    llm = llama_stock.Llama(model_path=str(base), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True,
                          type_k=f16, type_v=f16, flash_attn=True, n_gpu_layers=-1, verbose=False)
    try:
        llm.eval(ids)
        stock = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    # The same ggml CUDA kernels on the same file: equal but for accumulation order.
    assert max_diff(ours, stock) <= 1e-2
