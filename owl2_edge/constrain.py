"""Answers that follow a grammar (docs/structured.md): a JSON schema, any JSON object, or a
grammar in llama.cpp's GBNF or in Lark, compiled by llguidance into a token mask that the one
answer loop (answer.py) applies to the logits before sampling. So ask, chat, batch, the server
and concurrent answers all have it, and the answer can only end where the grammar accepts.

    spec = ConstraintSpec.json_schema({"type": "object", ...}, field="response_format")
    constraint = Constraint.compile(spec, tokenizer)   # GrammarError if it cannot compile
    state = constraint.start()                          # one per answer
    token = sample(state.mask(logits)); state.advance(token)

It fails closed: a schema or grammar llguidance cannot compile is refused before anything is
generated (never answered unconstrained), and a token the grammar refuses can never be chosen.

A constraint is untrusted input (a server's client sends it), so its cost is bounded, all in
BOUNDS (docs/structured.md, "Bounds"; /props lists them): its size, its nesting, the
alternatives of one grammar rule, every count (a regex's or a grammar's {n,m}, a schema's
minLength, minItems, minProperties), recursion that never reaches a value, and llguidance's own
parser limits. What breaks a bound is refused by name before anything is compiled; compiling
builds the answer's matcher once and computes its first mask, so a grammar that fails at its
start is refused too, and every answer starts from a copy (no compile on the engine's thread).
A limit the grammar engine still reaches in the middle of an answer ends that answer with a
GrammarError naming the field (a 400 to a server's client), never an unconstrained token.
"""

from __future__ import annotations

import json
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from owl2_edge.constraint_bounds import BOUNDS, check_schema, check_size
from owl2_edge.errors import GrammarError, Owl2Error
from owl2_edge.grammar_worker import first_line, lark_of

# The template's answer starts right after "ASSISTANT:" and the model's first token carries
# sentencepiece's word-start space (answer.py strips it from the text): the grammar lets the
# answer begin with one space, so the model starts as it was trained to.
_LEADING_SPACE = 'start: " "? @answer'


# How constrained JSON is laid out: {"key": value, "other": [1, 2]}, as Python's json.dumps.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}




@dataclass(frozen=True)
class ConstraintSpec:
    """What an answer must follow, checked for its shape but not compiled: kind "json_schema"
    (source: the schema as JSON text) or "grammar" (source: GBNF or Lark text); field: where it
    came from (response_format, json_schema, grammar), for the errors."""
    kind: str
    source: str
    field: str

    @classmethod
    def json_schema(cls, schema, field: str) -> "ConstraintSpec":
        if isinstance(schema, bool) or not isinstance(schema, dict):
            raise GrammarError(f"{field} must be a JSON schema object, not "
                               f"{type(schema).__name__}", field)
        try:
            text = json.dumps(schema)  # its own key order: the answer's keys come in it
        except (TypeError, ValueError, RecursionError) as e:
            raise GrammarError(f"{field} is not JSON: {e}", field) from None
        check_size(text, field)
        check_schema(schema, field)
        return cls("json_schema", text, field)

    @classmethod
    def grammar(cls, text, field: str = "grammar") -> "ConstraintSpec":
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"{field} must be a non-empty grammar text (GBNF or Lark)", field)
        check_size(text, field)
        return cls("grammar", text, field)

    @classmethod
    def response_format(cls, value, field: str = "response_format") -> "ConstraintSpec | None":
        """OpenAI's response_format: {"type": "text"} (None: no constraint), {"type":
        "json_object"} (any JSON object) or {"type": "json_schema", "json_schema": {"name",
        "schema", "strict"}}."""
        if not isinstance(value, dict):
            raise GrammarError(f"{field} must be an object such as {{\"type\": \"json_object\"}}",
                               field)
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            # llama-server's extension: a "schema" beside the type constrains the object.
            if "schema" in value:
                return cls.json_schema(value["schema"], f"{field}.schema")
            return cls.json_schema({"type": "object"}, field)
        if kind == "json_schema":
            inner = value.get("json_schema")
            if not isinstance(inner, dict) or "schema" not in inner:
                raise GrammarError(f"{field}.json_schema must be an object with a \"schema\"",
                                   f"{field}.json_schema")
            strict = inner.get("strict", False)
            if not isinstance(strict, bool) and strict is not None:
                raise GrammarError(f"{field}.json_schema.strict must be true or false",
                                   f"{field}.json_schema.strict")
            # strict or not, the answer follows the schema exactly: that is all this runtime does.
            return cls.json_schema(inner["schema"], f"{field}.json_schema.schema")
        raise GrammarError(f"{field}.type must be \"text\", \"json_object\" or \"json_schema\", "
                           f"not {kind!r}", f"{field}.type")


class Constraint:
    """A compiled grammar, ready to start any number of answers (one ConstraintState each):
    its matcher is built once, here, and each answer starts from a copy of it."""

    def __init__(self, spec: ConstraintSpec, matcher, n_vocab: int):
        self.spec, self._matcher, self.n_vocab = spec, matcher, n_vocab
        self.field = spec.field
        # The mask at the grammar's start, the same for every answer: computed once, at compile
        # (off the engine's thread), instead of at each answer's first token on it.
        self._first_allowed: np.ndarray | None = None

    @classmethod
    def compile(cls, spec: ConstraintSpec, tokenizer,
                to_lark: Callable[[str, str], str] = lark_of) -> "Constraint":
        """GrammarError when the spec cannot be compiled within BOUNDS, or its first mask
        cannot be computed. Slow for a large grammar (up to about a second): call it off any
        thread that others wait on. `to_lark(text, field)` turns a grammar into Lark (the server
        passes its child process's, grammar_worker.LarkWorker)."""
        from llguidance import LLMatcher
        if spec.kind == "json_schema":
            schema = json.loads(spec.source)
            if isinstance(schema, dict):
                # One layout, no free whitespace: a model may otherwise fill max_tokens with
                # spaces and newlines that JSON allows between any two tokens. A schema's own
                # "x-guidance" options (llguidance's) win.
                schema.setdefault("x-guidance", JSON_LAYOUT)
            answer = {"json_schema": schema}
        else:
            answer = {"lark_grammar": to_lark(spec.source, spec.field)}
        grammar = json.dumps({"grammars": [{"lark_grammar": _LEADING_SPACE},
                                           {"name": "answer", **answer}]})
        llg, limits = grammar_tokenizer(tokenizer), BOUNDS.parser_limits()
        error, messages = LLMatcher.validate_grammar_with_warnings(grammar, llg, limits=limits)
        if error:
            raise GrammarError(f"{spec.field} cannot be compiled: {first_line(messages[0])}",
                               spec.field)
        constraint = cls(spec, LLMatcher(llg, grammar, log_level=0, limits=limits),
                         tokenizer.n_vocab)
        # The first mask: a grammar that fails at once is refused here, and every answer
        # starts with this mask.
        first = constraint.start().allowed()
        first.flags.writeable = False
        constraint._first_allowed = first
        return constraint

    def start(self) -> "ConstraintState":
        """A fresh place at the grammar's start, for one answer."""
        return ConstraintState(self._matcher.deep_copy(), self.n_vocab, self.field,
                               self._first_allowed)


class ConstraintState:
    """One answer's place in the grammar. A limit the grammar engine reaches (its parser
    limits, BOUNDS) ends the answer with a GrammarError naming the field."""

    def __init__(self, matcher, n_vocab: int, field: str, first_allowed: np.ndarray | None = None):
        self.matcher, self.n_vocab, self.field = matcher, n_vocab, field
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._known_allowed = first_allowed  # the mask here, when known (read-only)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GrammarError(f"{self.field}: the grammar engine stopped: "
                               f"{first_line(self.matcher.get_error())}", self.field)

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the tokens the grammar allows next (EOS only where it accepts)."""
        if self._known_allowed is not None:
            return self._known_allowed
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[:self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of the logits with every token the grammar refuses at -inf."""
        out = np.array(logits, dtype=np.float32, copy=True)
        out[~self.allowed()] = -np.inf
        return out

    def advance(self, token: int) -> None:
        self._known_allowed = None
        if not self.matcher.consume_token(int(token)):
            # A token the mask allowed was refused: a limit reached (or a bug); the answer ends.
            self._check()
            raise Owl2Error(f"the grammar refused token {token}: "
                            f"{first_line(self.matcher.get_error())}")

    @property
    def complete(self) -> bool:
        """Whether the grammar takes nothing more (only the end of the answer)."""
        return self.matcher.is_stopped()


# llguidance's view of a vocabulary, built once per Tokenizer (~0.1 s for 32000 tokens).
_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def grammar_tokenizer(tokenizer):
    with _tokenizers_lock:
        llg = _tokenizers.get(tokenizer)
        if llg is None:
            from llguidance.llamacpp import lltokenizer_from_vocab
            with warnings.catch_warnings():  # it calls llama.cpp's deprecated per-token names
                warnings.simplefilter("ignore", DeprecationWarning)
                llg = lltokenizer_from_vocab(tokenizer.vocab, eos_token=tokenizer.eos_id)
            _tokenizers[tokenizer] = llg
        return llg


__all__ = ["BOUNDS", "ConstraintSpec", "Constraint", "ConstraintState", "GrammarError"]
