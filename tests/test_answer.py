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
