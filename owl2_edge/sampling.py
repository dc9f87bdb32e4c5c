"""Choosing the next token from logits: greedy, or temperature / top-k / top-p / min-p sampling
with an optional repetition penalty, in the order Hugging Face's generate applies them; before
them OpenAI's logit_bias and its frequency and presence penalties (docs/structured.md).

The order, for each token: the model's logits + logit_bias, − frequency_penalty × (times the
token was generated in this answer) − presence_penalty × (whether it was); then the grammar's
mask (answer.py) — logprobs are read here; then the repeat penalty (CTRL's, over the prompt and
answer's last repeat_last_n tokens), then greedy or temperature, top-k, top-p, min-p."""

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
# OpenAI's ranges: logit_bias values in [-100, 100] (±100 bans or forces a token), penalties in
# [-2, 2]; at most this many biased tokens.
MAX_LOGIT_BIAS, MAX_OPENAI_PENALTY, MAX_BIASED_TOKENS = 100.0, 2.0, 1024
MAX_TOP_LOGPROBS = 20
# Stop strings: at most this many, each at most this many characters (llama-server takes any;
# each is searched for in the answer's text after every token).
MAX_STOPS, MAX_STOP_CHARS = 16, 500


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
    frequency_penalty: float = 0.0  # OpenAI's: minus this per time the token was generated
    presence_penalty: float = 0.0   # OpenAI's: minus this once the token has been generated
    logit_bias: dict | None = None  # {token id: bias in [-100, 100]} added to the logits
    logprobs: bool = False          # record each token's log probability (stats.logprobs)
    top_logprobs: int = 0           # and the likeliest alternatives', 0..MAX_TOP_LOGPROBS
    # What the answer must follow (constrain.py), at most one: OpenAI's response_format, a JSON
    # schema (llama.cpp's json_schema), or a grammar in GBNF or Lark (llama.cpp's grammar).
    response_format: dict | None = None
    json_schema: dict | None = None
    grammar: str | None = None
    # The answer ends where one of these first appears, without it (answer_text.py): a string or
    # a list of them.
    stop: tuple[str, ...] = ()

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
        put("frequency_penalty", checks.number("frequency_penalty", self.frequency_penalty,
                                               -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY))
        put("presence_penalty", checks.number("presence_penalty", self.presence_penalty,
                                              -MAX_OPENAI_PENALTY, MAX_OPENAI_PENALTY))
        if self.logit_bias is not None:
            put("logit_bias", _logit_bias(self.logit_bias))
        put("logprobs", checks.flag("logprobs", self.logprobs))
        put("top_logprobs", checks.integer("top_logprobs", self.top_logprobs, 0,
                                           MAX_TOP_LOGPROBS))
        put("stop", _stop_strings(self.stop))
        if self.top_logprobs and not self.logprobs:
            raise ArgumentError("top_logprobs needs logprobs: true", "top_logprobs")
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


def _stop_strings(value) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else () if value is None else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ArgumentError("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in items):
        raise ArgumentError(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                            f"characters", "stop")
    return tuple(s for s in items if s)


def _logit_bias(value) -> dict[int, float]:
    """{token id: bias}, ids as ints or decimal strings (JSON keys); checked for range (the ids
    against the vocabulary by biased(), which knows its size)."""
    if not isinstance(value, dict):
        raise ArgumentError(f"logit_bias must be an object of token id: bias, not "
                            f"{type(value).__name__}")
    if len(value) > MAX_BIASED_TOKENS:
        raise ArgumentError(f"logit_bias: at most {MAX_BIASED_TOKENS} tokens")
    out = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if token is None or token < 0:
            raise ArgumentError(f"logit_bias: {key!r} is not a token id")
        out[token] = checks.number(f"logit_bias[{key}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    return out


def check_vocabulary(params: SamplingParams, n_vocab: int) -> None:
    """ArgumentError when logit_bias names a token the vocabulary does not have."""
    for token in params.logit_bias or {}:
        if token >= n_vocab:
            raise ArgumentError(f"logit_bias: token {token} is outside the vocabulary "
                                f"[0, {n_vocab})", "logit_bias")


def biased(params: SamplingParams, logits: np.ndarray, generated: list[int]) -> np.ndarray:
    """The logits after logit_bias and the frequency and presence penalties (a copy when any
    applies): what the grammar masks and the sampler, and logprobs, see."""
    if not params.logit_bias and not params.frequency_penalty and not params.presence_penalty:
        return logits
    logits = np.array(logits, dtype=np.float32, copy=True)
    for token, bias in (params.logit_bias or {}).items():
        logits[token] += bias
    if generated and (params.frequency_penalty or params.presence_penalty):
        tokens, counts = np.unique(np.asarray(generated), return_counts=True)
        logits[tokens] -= counts * params.frequency_penalty + params.presence_penalty
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and the likeliest tokens' at its step, from the
    logits after bias, penalties and the grammar's mask (before temperature and truncation)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    x = np.asarray(logits, dtype=np.float64)
    finite = x[np.isfinite(x)]
    log_z = finite.max() + np.log(np.exp(finite - finite.max()).sum())
    best = ()
    if top:
        order = np.argpartition(-x, min(top, x.size) - 1)[:top]
        order = order[np.argsort(-x[order], kind="stable")]
        best = tuple((int(t), float(x[t] - log_z)) for t in order if np.isfinite(x[t]))
    return TokenLogprob(int(token), float(x[token] - log_z), best)


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
