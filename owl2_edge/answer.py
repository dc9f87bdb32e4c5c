"""One answer, token by token: the loop every caller steps (docs/design.md §1, §14).

    answer = Answer(params, tokenizer, prompt_ids, prompt_positions, window)
    piece = answer.step(logits)            # logits of the prompt's last position
    while answer.token is not None:        # None once the answer is finished
        logits = evaluate(answer.token)    # the caller's decoder step
        piece = answer.step(logits)

An Answer holds what one answer decides — the sampler and its history, the stop conditions
(end of text, max_tokens, the context window), the UTF-8 assembly of the text and the finish
reason — and nothing of the KV cache: its caller evaluates each token. Owl2.stream steps one;
the batch engine steps one per sequence of the cache, and advances all of them with one decoder
pass per step. Every caller thereby stops, samples and spells an answer the same way.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from owl2_edge.constrain import Constraint
from owl2_edge.detok import Utf8Stream
from owl2_edge.errors import DecoderError, Owl2Error
from owl2_edge.sampling import Sampler, SamplingParams, biased, token_logprob
from owl2_edge.stats import Stats

# Why an answer ended (OpenAI's finish_reason, plus "context"): the end-of-text token, the
# max_tokens limit, or the context window's last position.
STOP, LENGTH, CONTEXT = "stop", "length", "context"


def check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        raise DecoderError("the decoder gave NaN or infinite logits: a weight in the model files "
                           "is damaged (or out of its type's range)")


class Answer:
    """params: the sampling options. tokenizer: token_to_bytes and eos_id. prompt_ids: the
    prompt's text token ids (what repeat_penalty looks at). prompt_positions: the positions the
    prompt takes in the cache (an image counts n_visual). window: the positions the answer's
    sequence may hold; the answer stops with "context" when the next token would not fit.
    stats: where the counts go (generated tokens and ids, finish reason, decode time).
    constraint: the compiled grammar the answer must follow (constrain.py), or None: its mask
    is applied to the logits before sampling, and the answer ends once the grammar is complete
    (finish "stop"); EOS is only possible where the grammar accepts."""

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids: Sequence[int],
                 prompt_positions: int, window: int, stats: Stats | None = None,
                 constraint: Constraint | None = None):
        self.params = params
        self.grammar = constraint.start() if constraint is not None else None
        self.sampler = Sampler(params)
        self.history = list(prompt_ids)
        self.text = Utf8Stream(tokenizer.token_to_bytes)
        self.eos = tokenizer.eos_id
        self.prompt_positions, self.window = prompt_positions, window
        self.stats = stats if stats is not None else Stats()
        self.stats.finish_reason = LENGTH  # until it ends otherwise (a reader may stop early)
        self.token: int | None = None  # the token for the caller to evaluate next
        self.finished = False
        self._spoken = False           # whether any text has been returned yet
        self._started_at = time.perf_counter()

    def step(self, logits: np.ndarray) -> str:
        """The logits of the answer's last position -> the text the next token completes ("" while
        a character is still incomplete). Afterwards `token` is the token to evaluate next, or
        None when the answer is finished: then stats.finish_reason says why, and the text
        returned includes whatever was left of the last character."""
        if self.finished:
            raise Owl2Error("this answer is finished")
        check_finite(logits)
        params, stats = self.params, self.stats
        logits = biased(params, logits, stats.tokens)
        if params.ignore_eos:
            logits = logits.copy()
            logits[self.eos] = -np.inf
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        token = self.sampler(logits, self.history)
        if self.grammar is not None:
            self.grammar.advance(token)
        if token == self.eos:
            return self._finish(STOP)
        if params.logprobs:
            stats.logprobs.append(token_logprob(logits, token, params.top_logprobs))
        stats.generated_tokens += 1
        stats.tokens.append(token)
        self.history.append(token)
        piece = self._spoken_text(self.text.push(token))
        if self.prompt_positions + stats.generated_tokens > self.window:
            return piece + self._finish(CONTEXT)
        if stats.generated_tokens == self.params.max_tokens:
            return piece + self._finish(LENGTH)
        if self.grammar is not None and self.grammar.complete:
            return piece + self._finish(STOP)  # only the end could follow: no step for it
        self.token = token
        return piece

    def _spoken_text(self, piece: str) -> str:
        # The first text carries sentencepiece's word-start space; upstream strips it.
        if not self._spoken:
            piece = piece.lstrip()
            self._spoken = bool(piece)
        return piece

    def _finish(self, reason: str) -> str:
        self.finished, self.token = True, None
        self.stats.finish_reason = reason
        self.stats.timings["decode"] = time.perf_counter() - self._started_at
        return self._spoken_text(self.text.flush())


__all__ = ["Answer", "check_finite", "STOP", "LENGTH", "CONTEXT"]
