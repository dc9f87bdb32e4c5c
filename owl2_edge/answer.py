"""One answer, token by token: the loop every caller steps (docs/design.md §1, §14).

    answer = Answer(params, tokenizer, prompt_ids, prompt_positions, window)
    piece = answer.step(logits)            # logits of the prompt's last position
    while answer.token is not None:        # None once the answer is finished
        logits = evaluate(answer.token)    # the caller's decoder step
        piece = answer.step(logits)

An Answer holds what one answer decides — the sampler and its history, the stop conditions
(end of text, a stop string, max_tokens, the context window, a complete grammar), its text as
shown (answer_text.py) and the finish reason — and nothing of the KV cache: its caller evaluates
each token. The engine (engine/scheduler.py) steps one per sequence of the cache and advances all
of them with one decoder pass per step; every route (ask, stream, chat, batch, the server, the
CLI) reads the text the engine hands its Job, so every caller stops, samples and spells an answer
the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from owl2_edge.answer_text import AnswerText
from owl2_edge.constrain import Constraint
from owl2_edge.errors import DecoderError, Owl2Error
from owl2_edge.sampling import Sampler, SamplingParams, biased, token_logprob
from owl2_edge.stats import Stats

# Why an answer ended (OpenAI's finish_reason, plus "context"): the end-of-text token (or a stop
# string, or a grammar complete), the max_tokens limit, or the context window's last position.
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
    stats: where the counts go (generated tokens and ids, finish reason).
    constraint: the compiled grammar the answer must follow (constrain.py), or None: its mask
    is applied to the logits before sampling, and the answer ends once the grammar is complete
    (finish "stop"); EOS is only possible where the grammar accepts. trim: the text's end
    whitespace is dropped (AnswerText; False for a raw completion)."""

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids: Sequence[int],
                 prompt_positions: int, window: int, stats: Stats | None = None,
                 constraint: Constraint | None = None, trim: bool = True):
        self.params = params
        self.grammar = constraint.start() if constraint is not None else None
        self.sampler = Sampler(params)
        self.history = list(prompt_ids)
        self.text = AnswerText(tokenizer.token_to_bytes, params.stop, trim)
        self.eos = tokenizer.eos_id
        self.prompt_positions, self.window = prompt_positions, window
        self.stats = stats if stats is not None else Stats()
        self.stats.finish_reason = LENGTH  # until it ends otherwise (a reader may stop early)
        self.token: int | None = None  # the token for the caller to evaluate next
        self.finished = False

    def step(self, logits: np.ndarray) -> str:
        """The logits of the answer's last position -> the text that can be shown once the next
        token is decided ("" while a character is incomplete, or while what came may begin a
        stop string or be end whitespace). Afterwards `token` is the token to evaluate next, or
        None when the answer is finished: then stats.finish_reason says why, and the text
        returned includes whatever was held back."""
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
        piece = self.text.push(token)
        if self.text.stopped:
            return piece + self._finish(STOP)
        if self.prompt_positions + stats.generated_tokens > self.window:
            return piece + self._finish(CONTEXT)
        if stats.generated_tokens == self.params.max_tokens:
            return piece + self._finish(LENGTH)
        if self.grammar is not None and self.grammar.complete:
            return piece + self._finish(STOP)  # only the end could follow: no step for it
        self.token = token
        return piece

    def _finish(self, reason: str) -> str:
        self.finished, self.token = True, None
        tail = self.text.end()
        # The held-back text may hold a stop string only the end reveals.
        self.stats.finish_reason = STOP if self.text.stopped else reason
        return tail


__all__ = ["Answer", "check_finite", "STOP", "LENGTH", "CONTEXT"]
