"""How far a candidate model folder (a quantization) is from a reference folder (`owl2 compare`).

The reference answers every question greedily; both models then read the same prompt followed by
the reference's answer (teacher forcing), and at every answer position (its end-of-text
included) the two next-token distributions are compared:

    KL       mean and 99th percentile of KL(reference || candidate), in nats
    top-1    how often both put the same token first
    ppl      perplexity of the reference's answers under the candidate / under the reference
    same     how often the candidate's own greedy answer equals the reference's
    cosine   mean cosine similarity of the two vision models' image embeddings
    accuracy exact-match accuracy of each model, where the questions have answers (evaluate.py)

One model is loaded at a time: the reference's log-probabilities and embeddings are kept (float32,
answer positions only), then it is closed and the candidate loaded, so comparing two 7B folders
needs the memory of one. docs/design.md §10 says why these measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from owl2_edge.tools.evaluate import DEFAULT_MAX_TOKENS, Item, Report, is_correct
from owl2_edge.prompt import Turn, render


@dataclass
class _Reference:
    """What the reference model said about one item."""
    answer: str
    continuation: list[int]     # its answer's ids (+ eos when it stopped there)
    logprobs: np.ndarray        # [len(continuation), n_vocab]
    embeds: np.ndarray | None   # [n_visual, n_embd] of the item's image


@dataclass
class Comparison:
    kl: list[float] = field(default_factory=list)          # one per answer position
    top1: list[bool] = field(default_factory=list)
    nll_reference: list[float] = field(default_factory=list)
    nll_candidate: list[float] = field(default_factory=list)
    same_answer: list[bool] = field(default_factory=list)  # one per item
    cosine: list[float] = field(default_factory=list)      # one per item with an image
    reference_accuracy: Report = field(default_factory=Report)
    candidate_accuracy: Report = field(default_factory=Report)

    def to_dict(self) -> dict:
        kl = np.asarray(self.kl, dtype=np.float64)
        out = {
            "positions": len(self.kl),
            "questions": len(self.same_answer),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "top1_agreement": round(float(np.mean(self.top1)), 4),
            "ppl_ratio": round(float(np.exp(np.mean(self.nll_candidate)
                                            - np.mean(self.nll_reference))), 4),
            "same_answer": round(float(np.mean(self.same_answer)), 4),
            "image_cosine": round(float(np.mean(self.cosine)), 6) if self.cosine else None,
        }
        if self.reference_accuracy.total:
            out["reference"] = self.reference_accuracy.to_dict()
            out["candidate"] = self.candidate_accuracy.to_dict()
        return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def _prompt(item: Item) -> tuple[str, list]:
    images = [] if item.image is None else [item.image]
    return render([Turn(item.question)], n_images=len(images)), images


def _answer_logprobs(owl, item: Item, continuation: list[int]) -> np.ndarray:
    """Log-probabilities [len(continuation), n_vocab] of the positions that predict the
    continuation: the last prompt position and every continuation position but the last."""
    prompt, images = _prompt(item)
    logits = owl.logits(prompt, images, continuation=continuation)
    return _log_softmax(logits[len(logits) - len(continuation) - 1:-1])


def reference_pass(owl, items: Sequence[Item], max_tokens: int = DEFAULT_MAX_TOKENS,
                   on_progress: Callable[[int, int], None] | None = None) -> list[_Reference]:
    out = []
    for i, item in enumerate(items):
        images = [] if item.image is None else [item.image]
        answer = owl.ask(images, item.question, temperature=0, max_tokens=max_tokens)
        continuation = list(owl.stats.tokens)
        if owl.stats.finish_reason == "stop":
            continuation.append(owl.tokenizer.eos_id)
        embeds = owl.encode_image(images[0]) if images else None
        out.append(_Reference(answer, continuation, _answer_logprobs(owl, item, continuation),
                              embeds))
        if on_progress:
            on_progress(i + 1, len(items))
    return out


def candidate_pass(owl, items: Sequence[Item], refs: Sequence[_Reference],
                   max_tokens: int = DEFAULT_MAX_TOKENS,
                   on_progress: Callable[[int, int], None] | None = None) -> Comparison:
    result = Comparison()
    for i, (item, ref) in enumerate(zip(items, refs)):
        images = [] if item.image is None else [item.image]
        answer = owl.ask(images, item.question, temperature=0, max_tokens=max_tokens)
        result.same_answer.append(answer == ref.answer)
        if item.answers:
            result.reference_accuracy.add(item.kind, is_correct(ref.answer, item.answers))
            result.candidate_accuracy.add(item.kind, is_correct(answer, item.answers))
        if ref.continuation:
            p_log = ref.logprobs.astype(np.float64)
            q_log = _answer_logprobs(owl, item, ref.continuation).astype(np.float64)
            result.kl.extend((np.exp(p_log) * (p_log - q_log)).sum(-1).clip(min=0).tolist())
            result.top1.extend((p_log.argmax(-1) == q_log.argmax(-1)).tolist())
            rows = np.arange(len(ref.continuation))
            result.nll_reference.extend((-p_log[rows, ref.continuation]).tolist())
            result.nll_candidate.extend((-q_log[rows, ref.continuation]).tolist())
        if ref.embeds is not None:
            a, b = ref.embeds.ravel(), owl.encode_image(images[0]).ravel()
            result.cosine.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        if on_progress:
            on_progress(i + 1, len(items))
    return result


def compare(reference_dir, candidate_dir, items: Sequence[Item], load: Callable,
            max_tokens: int = DEFAULT_MAX_TOKENS,
            on_progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    """`load(path)` opens a model folder as an Owl2 (with the caller's runtime options)."""
    def stage(name):
        return (lambda done, total: on_progress(name, done, total)) if on_progress else None

    with load(reference_dir) as owl:
        refs = reference_pass(owl, items, max_tokens, stage("reference"))
    with load(candidate_dir) as owl:
        return candidate_pass(owl, items, refs, max_tokens, stage("candidate"))
