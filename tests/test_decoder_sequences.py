"""Several sequences in one KV cache (cpp_ext/owl2_kv_cache.cpp, docs/design.md §14): every
sequence's logits, in mixed steps where prompts of both modalities join, answers go on and others
end, equal that sequence's logits run alone; copy / clear / rewind / save / restore per sequence;
and the cache's cells are reused after sequences end."""

from __future__ import annotations

import numpy as np
import pytest

from owl2_edge.decoder import MAX_SEQUENCES, Decoder, KVState
from owl2_edge.errors import ArgumentError, ContextFullError, DecoderError
from owl2_edge.model_dir import Manifest

TOL = 1e-4  # max abs logit difference (F32 pair, f32 KV cache), as tests/test_decoder.py


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    m = Manifest.load(tiny_model_dir)
    return tiny_model_dir / m.decoder_file, tiny_model_dir / m.mam_file


def _decoder(pair, **kw):
    options = dict(n_ctx=256, kv_type="f32", device="cpu", n_threads=2)
    options.update(kw)
    return Decoder(*pair, **options)


def _image(dec, seed, n=9):
    return np.random.default_rng(seed).normal(0, 1, (n, dec.n_embd)).astype(np.float32)


def _prompts(dec):
    """Four prompts: text only, image in the middle, image first, short text (ids folded into
    the tiny vocabulary)."""
    v = dec.n_vocab
    ids = lambda *xs: [3 + x % (v - 3) for x in xs]  # noqa: E731
    return {
        "text": [ids(11, 12, 13, 14, 15, 16, 17)],
        "mid": [ids(1, 30, 31), _image(dec, 1), ids(40, 41, 42)],
        "first": [_image(dec, 2), ids(50, 51)],
        "short": [ids(60, 61)],
    }


def _alone(dec, runs, continuation):
    """Logits of the prompt's last position, then after each continuation token, with the
    sequence alone in the cache."""
    for s in range(4):
        dec.clear_sequence(s)
    out = [dec.eval_runs(runs)]
    for t in continuation:
        out.append(dec.eval_tokens([t]))
    return np.stack(out)


def _on(device: str, pair, **kw) -> Decoder:
    try:
        return _decoder(pair, device=device, **kw)
    except DecoderError as e:
        if "no GPU device" in str(e):
            pytest.skip("the installed ggml has no GPU device")
        raise


# On a GPU attention always takes ggml's fused kernel, which reads K/V as f16 (and pads what it
# reads, masked): each sequence is then equal to itself alone to that kernel's rounding.
@pytest.mark.parametrize("device,tol", [("cpu", TOL), ("cuda", 1e-2)])
def test_each_sequence_in_mixed_steps_equals_it_alone(pair, device, tol):
    with _on(device, pair) as dec:
        prompts = _prompts(dec)
        rng = np.random.default_rng(0)
        cont = {name: [int(t) for t in rng.integers(3, dec.n_vocab, 6)] for name in prompts}
        expected = {name: _alone(dec, prompts[name], cont[name]) for name in prompts}
        for s in range(4):
            dec.clear_sequence(s)

        # The schedule: sequence id -> prompt; "text" and "mid" start together, "first" joins at
        # step 2 in sequence 2, "text" ends after 3 tokens and "short" takes its sequence (0).
        got = {name: [] for name in prompts}
        seq_of = {"text": 0, "mid": 1}
        fed = {"text": 0, "mid": 0}
        step = [(0, prompts["text"]), (1, prompts["mid"])]
        for k in range(8):
            logits = dec.eval_sequences(step)
            assert logits.shape == (len(step), dec.n_vocab)
            by_seq = dict(zip([s for s, _ in step], logits))
            for name, s in seq_of.items():
                if s in by_seq:
                    got[name].append(by_seq[s])
            step = []
            if k == 2:
                dec.clear_sequence(0)  # "text" ends with 3 tokens fed
                del seq_of["text"]
                seq_of["short"], fed["short"] = 0, 0
                step.append((0, prompts["short"]))
            if k == 1:
                seq_of["first"], fed["first"] = 2, 0
                step.append((2, prompts["first"]))
            for name, s in seq_of.items():
                if any(seq == s for seq, _ in step) or fed[name] >= len(cont[name]):
                    continue
                step.append((s, [[cont[name][fed[name]]]]))
                fed[name] += 1
            step.sort()
            if not step:
                break
        for name, rows in got.items():
            rows = np.stack(rows)
            want = expected[name][:len(rows)]
            assert len(rows) >= 3, name
            np.testing.assert_allclose(rows, want, atol=tol, rtol=0, err_msg=name)
            assert (rows.argmax(-1) == want.argmax(-1)).all(), name


def test_all_logits_of_two_sequences_in_one_pass_equal_each_alone(pair):
    with _decoder(pair, n_ubatch=5) as dec:  # ubatches cut through both sequences
        prompts = _prompts(dec)
        alone = {}
        for name in ("mid", "text"):
            dec.clear_sequence(0)
            alone[name] = dec.eval_runs(prompts[name], all_logits=True)
        dec.clear_sequence(0)
        both = dec.eval_sequences([(3, prompts["mid"]), (5, prompts["text"])], all_logits=True)
        n_mid = len(alone["mid"])
        np.testing.assert_allclose(both[:n_mid], alone["mid"], atol=TOL, rtol=0)
        np.testing.assert_allclose(both[n_mid:], alone["text"], atol=TOL, rtol=0)
        assert dec.n_past_of(3) == n_mid and dec.n_past_of(5) == len(alone["text"])
        assert dec.n_past == 0


def test_a_query_never_sees_another_sequences_keys(pair):
    """The same prompt in two sequences, one of them after a different history: had the mask
    let sequence 1 see sequence 0's cells, its logits would move."""
    with _decoder(pair) as dec:
        p = _prompts(dec)
        alone = dec.eval_runs(p["short"])
        dec.clear_sequence(0)
        dec.eval_sequences([(0, p["mid"]), (1, p["first"])])
        np.testing.assert_allclose(dec.eval_runs(p["short"], seq=7), alone, atol=TOL, rtol=0)


def test_copy_shares_a_prefix_and_rewind_clear_work_per_sequence(pair):
    with _decoder(pair) as dec:
        p = _prompts(dec)
        want = {t: _alone(dec, p["mid"], [t, 3]) for t in (5, 9)}
        dec.clear_sequence(0)
        dec.eval_runs(p["mid"], seq=0)
        n_prompt, free_after_prompt = dec.n_past, dec.n_free
        dec.copy_sequence(0, 1)
        assert dec.n_free == free_after_prompt  # shared cells: none used
        assert dec.n_past_of(1) == n_prompt
        got = dec.eval_sequences([(0, [[5]]), (1, [[9]])])
        np.testing.assert_allclose(got[0], want[5][1], atol=TOL, rtol=0)
        np.testing.assert_allclose(got[1], want[9][1], atol=TOL, rtol=0)
        # Rewinding sequence 1 keeps the prompt cells sequence 0 shares.
        dec.rewind(1, seq=1)
        np.testing.assert_allclose(dec.eval_runs([[9]], seq=1), want[9][1], atol=TOL, rtol=0)
        # Clearing sequence 0 leaves sequence 1 whole.
        dec.clear_sequence(0)
        assert dec.n_past == 0 and dec.n_past_of(1) == n_prompt + 1
        np.testing.assert_allclose(dec.eval_runs([[3]], seq=1), want[9][2], atol=TOL, rtol=0)


def test_save_and_restore_move_a_sequence_between_ids(pair):
    with _decoder(pair) as dec:
        p = _prompts(dec)
        dec.eval_runs(p["text"], seq=4)
        state = dec.save_state(seq=4)
        assert state.n_past == dec.n_past_of(4)
        want = dec.eval_runs([[7]], seq=4)
        dec.clear_sequence(4)
        dec.eval_runs(p["short"], seq=0)  # other cells in use: the state lands elsewhere
        dec.restore_state(state, seq=2)
        np.testing.assert_allclose(dec.eval_runs([[7]], seq=2), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("kv", [dict(kv_type="f32"), dict(kv_type="f16", flash_attn=True)])
def test_a_prefix_saved_as_bytes_restores_in_another_decoder(pair, kv):
    """What the disk cache does: the first n positions of a sequence as bytes (parts), rebuilt
    (from_parts) in another decoder with another context size, continue as the prefix did."""
    with _decoder(pair, **kv) as dec:
        p = _prompts(dec)
        prefix = p["mid"][:2]                     # text, then an image: a picture prefix
        dec.eval_runs(prefix, seq=3)
        n = dec.n_past_of(3)
        dec.eval_runs([p["mid"][2]], seq=3)       # the question after it
        state = dec.save_state(seq=3, n_positions=n)
        assert state.n_past == n and state.layout == dec.cache_layout
        parts, layout = [bytes(x) for x in state.parts()], state.layout
        dec.clear_sequence(3)
        dec.eval_runs(prefix, seq=0)
        want = dec.eval_runs([p["mid"][2]], seq=0)
        with pytest.raises(DecoderError, match="cannot save"):
            dec.save_state(seq=0, n_positions=dec.n_past + 1)
    with _decoder(pair, n_ctx=512, **kv) as other:
        other.restore_state(KVState.from_parts(n, layout, parts), seq=5)
        np.testing.assert_allclose(other.eval_runs([p["mid"][2]], seq=5), want, atol=TOL, rtol=0)
        # Bytes that are not n positions of this layout are refused, never read past.
        for bad in (KVState.from_parts(n + 1, layout, parts),
                    KVState.from_parts(n, layout, parts[:-2]),
                    KVState.from_parts(n, layout, [parts[0][:-1], *parts[1:]]),
                    KVState.from_parts(n, layout + "x", parts)):
            with pytest.raises(DecoderError):
                other.restore_state(bad, seq=6)
        assert other.n_past_of(6) == 0


def test_freed_cells_are_reused_and_a_run_splits_across_holes(pair):
    with _decoder(pair, n_ctx=24) as dec:
        p = _prompts(dec)
        n_short = 2
        for s in range(12):  # fill the cache with twelve 2-position sequences
            dec.eval_runs(p["short"], seq=s)
        assert dec.n_free == 0
        with pytest.raises(ContextFullError):
            dec.eval_runs([[3]], seq=20)
        for s in (1, 4, 7):  # three holes of two cells
            dec.clear_sequence(s)
        assert dec.n_free == 3 * n_short
        # A 6-position run has no hole that holds it: it is split over the three.
        alone_runs = [[3 + k for k in range(6)]]
        got = dec.eval_runs(alone_runs, seq=30, all_logits=True)
        for s in range(12):
            dec.clear_sequence(s)
        dec.clear_sequence(30)
        np.testing.assert_allclose(got, dec.eval_runs(alone_runs, all_logits=True), atol=TOL, rtol=0)


def test_bad_sequence_ids_and_calls_are_refused_and_the_decoder_goes_on(pair):
    with _decoder(pair) as dec:
        for bad in (-1, MAX_SEQUENCES, "0", 1.0):
            with pytest.raises(ArgumentError):
                dec.eval_runs([[3]], seq=bad)
        with pytest.raises(DecoderError, match="at most once"):
            dec.eval_sequences([(0, [[3]]), (0, [[4]])])
        with pytest.raises(DecoderError, match="cannot rewind"):
            dec.rewind(1, seq=3)
        assert dec.n_past == 0 and dec.n_free == 256
        assert dec.eval_runs([[3]]).shape == (dec.n_vocab,)


def test_a_step_of_many_image_prompts_and_tokens_equals_each_alone(pair):
    """Twelve image prompts and eight decode tokens in one call: more route changes than one
    graph takes (the call is cut into several), every sequence's logits still its own."""
    with _decoder(pair, n_ctx=512) as dec:
        v = dec.n_vocab
        prompts = {s: [[3 + (s * 7 + k) % (v - 3) for k in range(2)], _image(dec, 10 + s),
                       [3 + (s * 5 + k) % (v - 3) for k in range(3)]] for s in range(12)}
        tokens = {12 + s: [[3 + (s * 11) % (v - 3)]] for s in range(8)}
        alone = {}
        for s, runs in {**prompts, **tokens}.items():
            dec.clear_sequence(0)
            alone[s] = dec.eval_runs(runs)
        dec.clear_sequence(0)
        got = dec.eval_sequences(list({**prompts, **tokens}.items()))
        for row, s in zip(got, [*prompts, *tokens]):
            np.testing.assert_allclose(row, alone[s], atol=TOL, rtol=0, err_msg=str(s))
