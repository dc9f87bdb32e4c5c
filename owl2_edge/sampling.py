"""Choosing the next token from logits: greedy, or temperature / top-k / top-p / min-p sampling
with an optional repetition penalty, in the order Hugging Face's generate applies them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from owl2_edge import checks
from owl2_edge.constrain import ConstraintSpec, GrammarError
from owl2_edge.errors import ArgumentError

# Beyond these nothing changes but the arithmetic's range: a temperature of 1000 is already a
# uniform draw, a penalty of 1000 already removes every repeated token, and no context holds
# more than 2^20 positions.
MAX_TEMPERATURE = 1000.0
MAX_PENALTY = 1000.0
MAX_TOKENS = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    # Upstream CLI defaults (docs/architecture.md §8): do_sample, temperature 0.2, HF's top_k 50.
    temperature: float = 0.2
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 512
    ignore_eos: bool = False   # never end on eos (benchmarks, stress tests), as llama.cpp's flag
    # What the answer must follow (constrain.py), at most one: OpenAI's response_format, a JSON
    # schema (llama.cpp's json_schema), or a grammar in GBNF or Lark (llama.cpp's grammar).
    response_format: dict | None = None
    json_schema: dict | None = None
    grammar: str | None = None

    def __post_init__(self):
        # Frozen: the checked (and normalised) values are written through object.__setattr__.
        def put(name, value):
            object.__setattr__(self, name, value)
        put("temperature", checks.number("temperature", self.temperature, 0, MAX_TEMPERATURE))
        put("top_k", checks.integer("top_k", self.top_k, 0))
        put("top_p", checks.number("top_p", self.top_p, 0, 1, lo_open=True))
        put("min_p", checks.number("min_p", self.min_p, 0, 1, hi_open=True))
        put("repeat_penalty", checks.number("repeat_penalty", self.repeat_penalty, 0, MAX_PENALTY,
                                            lo_open=True))
        put("repeat_last_n", checks.integer("repeat_last_n", self.repeat_last_n, 0))
        if self.seed is not None:
            put("seed", checks.integer("seed", self.seed, 0, 2**64 - 1))
        put("max_tokens", checks.integer("max_tokens", self.max_tokens, 1, MAX_TOKENS))
        put("ignore_eos", checks.flag("ignore_eos", self.ignore_eos))
        given = [name for name in ("response_format", "json_schema", "grammar")
                 if getattr(self, name) is not None]
        if len(given) > 1:
            raise GrammarError(f"give one of response_format, json_schema and grammar, not "
                               f"{' and '.join(given)}", given[1])
        spec = None
        if self.response_format is not None:
            spec = ConstraintSpec.response_format(self.response_format)
        elif self.json_schema is not None:
            spec = ConstraintSpec.json_schema(self.json_schema, "json_schema")
        elif self.grammar is not None:
            spec = ConstraintSpec.grammar(self.grammar)
        if spec is not None and self.ignore_eos:
            raise GrammarError(f"ignore_eos cannot be combined with {spec.field}: the grammar "
                               f"decides where the answer ends", "ignore_eos")
        put("constraint", spec)

    @classmethod
    def of(cls, options: dict) -> "SamplingParams":
        """From keyword options as the API takes them (**sampling), refusing unknown names."""
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise ArgumentError(f"unknown sampling option {unknown[0]!r}; known: "
                                f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**options)

    # constraint: the checked ConstraintSpec of the field given (None: free text); set above.
    constraint = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous: list[int]) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float64).copy()
        if p.repeat_penalty != 1.0 and previous:
            # CTRL-style penalty as HF applies it: shrink positive logits, grow negative ones.
            recent = np.unique(np.asarray(previous[-p.repeat_last_n:] if p.repeat_last_n > 0 else previous))
            recent = recent[(recent >= 0) & (recent < logits.size)]
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits /= p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cumulative, p.top_p)) + 1
            drop = order[cut:]
            probs[drop] = 0.0
        if p.min_p > 0:
            probs[probs < p.min_p * probs.max()] = 0.0
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
