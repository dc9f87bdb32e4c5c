"""The one answer loop (owl2_edge/answer.py), stepped by hand with logits that pick each token:
every way an answer ends, the UTF-8 assembly and the first piece's word-start space, on the
tiny model's real vocabulary. Owl2.stream and the batch engine both step this class, so what
holds here holds for ask, chat, batch and serve (tests/test_batch_engine.py shows batch == ask)."""

from __future__ import annotations

import numpy as np
import pytest

from owl2_edge.answer import CONTEXT, LENGTH, STOP, Answer
from owl2_edge.errors import DecoderError, Owl2Error
from owl2_edge.sampling import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from owl2_edge.model_dir import Manifest
    from owl2_edge.tokenizer import Tokenizer
    with Tokenizer(tiny_model_dir / Manifest.load(tiny_model_dir).decoder_file) as t:
        yield t


def _picking(tokenizer, token: int) -> np.ndarray:
    """Logits whose argmax is `token` (greedy sampling then takes it)."""
    logits = np.zeros(tokenizer.n_vocab, dtype=np.float32)
    logits[token] = 10.0
    return logits


def _word_ids(tokenizer) -> list[int]:
    """The ids of a short text, without the BOS the template adds."""
    ids = tokenizer.tokenize("Red square")
    return [t for t in ids if t != tokenizer.bos_id]


def _run(tokenizer, tokens, params, prompt_positions=5, window=100):
    """Step an answer through `tokens` (as the decoder would have picked them); its pieces and
    the answer. Stops stepping once the answer says it is finished."""
    answer = Answer(params, tokenizer, [tokenizer.bos_id], prompt_positions, window)
    pieces = []
    for token in tokens:
        pieces.append(answer.step(_picking(tokenizer, token)))
        if answer.token is None:
            break
        assert answer.token == token  # what the caller evaluates next
    return pieces, answer


def test_eos_ends_with_stop_and_the_text_is_the_tokens(tokenizer):
    words = _word_ids(tokenizer)
    pieces, answer = _run(tokenizer, [*words, tokenizer.eos_id],
                          SamplingParams(temperature=0, max_tokens=50))
    assert answer.finished and answer.stats.finish_reason == STOP
    assert answer.stats.tokens == words and answer.stats.generated_tokens == len(words)
    assert "".join(pieces) == tokenizer.detokenize(words).strip()
    assert not pieces[0].startswith(" ")  # sentencepiece's word-start space is not spoken


def test_max_tokens_ends_with_length(tokenizer):
    words = _word_ids(tokenizer)
    _, answer = _run(tokenizer, words * 3, SamplingParams(temperature=0, max_tokens=2))
    assert answer.stats.finish_reason == LENGTH and answer.stats.generated_tokens == 2


def test_the_window_ends_with_context_when_the_next_token_would_not_fit(tokenizer):
    words = _word_ids(tokenizer)
    # 5 prompt positions in a window of 7: the 3rd token would need position 8.
    _, answer = _run(tokenizer, words * 3, SamplingParams(temperature=0, max_tokens=50),
                     prompt_positions=5, window=7)
    assert answer.stats.finish_reason == CONTEXT and answer.stats.generated_tokens == 3


def test_ignore_eos_never_ends_on_eos(tokenizer):
    logits = _picking(tokenizer, tokenizer.eos_id)
    answer = Answer(SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), tokenizer,
                    [tokenizer.bos_id], 5, 100)
    while not answer.finished:
        answer.step(logits)
    assert answer.stats.finish_reason == LENGTH
    assert tokenizer.eos_id not in answer.stats.tokens and len(answer.stats.tokens) == 3


def test_a_character_split_across_tokens_comes_out_whole(tokenizer):
    # "é" as its two UTF-8 bytes, each a byte token of the sentencepiece vocabulary.
    byte_ids = [t for t in tokenizer.tokenize("é") if t != tokenizer.bos_id]
    if len(byte_ids) < 2:
        pytest.skip("the tiny vocabulary has 'é' as one piece")
    pieces, answer = _run(tokenizer, [*byte_ids, tokenizer.eos_id],
                          SamplingParams(temperature=0, max_tokens=50))
    assert pieces[0] == ""  # half a character is held back, never shown
    assert "".join(pieces) == "é" and answer.stats.finish_reason == STOP


def test_nan_logits_and_a_finished_answer_are_refused(tokenizer):
    answer = Answer(SamplingParams(temperature=0), tokenizer, [tokenizer.bos_id], 5, 100)
    bad = _picking(tokenizer, 3)
    bad[7] = np.nan
    with pytest.raises(DecoderError, match="NaN or infinite logits"):
        answer.step(bad)
    answer.step(_picking(tokenizer, tokenizer.eos_id))
    with pytest.raises(Owl2Error, match="finished"):
        answer.step(_picking(tokenizer, 3))


def _ids(tokenizer, text: str) -> list[int]:
    return [t for t in tokenizer.tokenize(text) if t != tokenizer.bos_id]


@pytest.mark.parametrize("trim", [True, False])
def test_end_whitespace_is_held_back_and_dropped_at_the_end_when_trimmed(tokenizer, trim):
    # "Red." then a newline and spaces, then the end: a trimmed answer never shows the tail,
    # streamed or not; a raw completion's (trim=False) keeps it.
    tokens = [*_ids(tokenizer, "Red."), *_ids(tokenizer, "\n  "), tokenizer.eos_id]
    answer = Answer(SamplingParams(temperature=0, max_tokens=50), tokenizer, [tokenizer.bos_id],
                    5, 100, trim=trim)
    pieces = [answer.step(_picking(tokenizer, t)) for t in tokens]
    decided = tokenizer.detokenize(answer.stats.tokens)
    assert "".join(pieces) == (decided.strip() if trim else decided.lstrip())
    assert ("".join(pieces) == "Red.") == trim


def test_whitespace_inside_the_answer_is_shown_once_text_follows_it(tokenizer):
    tokens = [*_ids(tokenizer, "Red square"), tokenizer.eos_id]
    pieces, _ = _run(tokenizer, tokens, SamplingParams(temperature=0, max_tokens=50))
    assert "".join(pieces) == tokenizer.detokenize(tokens[:-1]).strip()
    assert " " in "".join(pieces)


def test_a_stop_string_ends_the_answer_at_once_without_it(tokenizer):
    words = _ids(tokenizer, "Red square. Blue circle.")
    params = SamplingParams(temperature=0, max_tokens=50, stop=["."])
    pieces, answer = _run(tokenizer, words, params)
    assert "".join(pieces) == "Red square"
    assert answer.finished and answer.stats.finish_reason == STOP
    # Decoding stopped at the token that completed the stop string: nothing after it was asked.
    shown = tokenizer.detokenize(answer.stats.tokens)
    assert shown.endswith(".") and shown.count(".") == 1


def test_a_stop_string_across_tokens_is_held_back_until_it_is_decided(tokenizer):
    words = _ids(tokenizer, "Red square and blue circle")
    params = SamplingParams(temperature=0, max_tokens=50, stop=["and blue"])
    pieces, answer = _run(tokenizer, [*words, tokenizer.eos_id], params)
    assert "".join(pieces) == "Red square"  # the space before the stop string is end space
    assert answer.stats.finish_reason == STOP
    # A text that only starts like a stop string is shown once it turns out not to be one.
    params = SamplingParams(temperature=0, max_tokens=50, stop=["and green"])
    pieces, answer = _run(tokenizer, [*words, tokenizer.eos_id], params)
    assert "".join(pieces) == "Red square and blue circle"
