"""How much one constraint (a JSON schema or a grammar an answer must follow) may cost, and the
checks of its source against that, made before anything is compiled (docs/structured.md,
"Bounds"). A constraint is untrusted input: a server's client sends it, and compiling it or
computing its masks runs on the machine that answers everyone.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from owl2_edge.errors import GrammarError


@dataclass(frozen=True)
class ConstraintBounds:
    """What one constraint may cost. The first five are checked on the source before anything
    is compiled; the parser limits are llguidance's own (its defaults), named here so that they
    are documented and listed in /props; compile_seconds is how long a server waits for a
    compile (off its event loop and the engine's thread) before refusing the request."""
    max_source_bytes: int = 64 * 1024   # a schema's JSON text, or a grammar's text
    max_depth: int = 64                 # a schema's nesting of objects and lists
    # One grammar rule's alternatives: every one is an item of the parser's row when the rule
    # is predicted, and a row holds at most max_items_in_row (20,000 alternatives failed at the
    # answer's second token).
    max_alternatives: int = 1000
    # A count: {n,m} in a regex (a schema's pattern) or a grammar, and a schema's minLength,
    # minItems, minProperties (an answer that must hold more than this cannot fit an answer's
    # max_tokens; a^{1000000} exhausted the lexer at the second token).
    max_count: int = 10_000
    compile_seconds: float = 10.0
    # llguidance's parser limits (LLParserLimits).
    max_items_in_row: int = 2000
    initial_lexer_fuel: int = 1_000_000
    step_lexer_fuel: int = 200_000
    step_max_items: int = 50_000
    max_lexer_states: int = 250_000
    max_grammar_size: int = 500_000

    def to_dict(self) -> dict:
        return asdict(self)

    def parser_limits(self):
        from llguidance import LLParserLimits
        return LLParserLimits(
            max_items_in_row=self.max_items_in_row, initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel, step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states, max_grammar_size=self.max_grammar_size,
            verbose_errors=False)


BOUNDS = ConstraintBounds()


# A schema's keywords that force an answer to hold at least this many characters, items or
# properties; each is at most BOUNDS.max_count.
_LOWER_BOUND_KEYWORDS = ("minLength", "minItems", "minProperties", "minContains")
# Where a schema names a subschema that is a value's own type (not a part of it): a $ref cycle
# through only these never reaches a value, so it can never be written.
_SAME_VALUE_KEYWORDS = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")
# {n}, {n,}, {n,m} in a regex (a grammar's or a pattern's), and Lark's ~ n and ~ n..m.
_BRACE_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_TILDE_COUNT = re.compile(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?")
_RULE_START = re.compile(r"\s*[?!]?[A-Za-z_][\w.]*\s*(?:::=|:)")


def check_size(text: str, field: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > BOUNDS.max_source_bytes:
        raise GrammarError(f"{field} is {size:,} bytes; at most {BOUNDS.max_source_bytes:,} "
                           f"(docs/structured.md, bounds)", field)


def _check_count(n: str | None, what: str, field: str) -> None:
    if n and int(n) > BOUNDS.max_count:
        raise GrammarError(f"{field}: {what} {int(n):,} is more than the {BOUNDS.max_count:,} an "
                           f"answer may be asked to repeat (docs/structured.md, bounds)", field)


def _check_regex_counts(regex: str, field: str) -> None:
    for m in _BRACE_COUNT.finditer(regex):
        for n in m.groups():
            _check_count(n, "a count of", field)


def check_schema(schema, field: str) -> None:
    """A JSON schema's nesting, counts, patterns and $ref cycles against BOUNDS."""
    def walk(node, depth: int) -> None:
        if depth > BOUNDS.max_depth:
            raise GrammarError(f"{field} nests deeper than {BOUNDS.max_depth} levels "
                               f"(docs/structured.md, bounds)", field)
        if isinstance(node, list):
            for item in node:
                walk(item, depth + 1)
            return
        if not isinstance(node, dict):
            return
        for key in _LOWER_BOUND_KEYWORDS:
            if isinstance(node.get(key), int) and not isinstance(node.get(key), bool):
                _check_count(str(node[key]), key, field)
        if isinstance(node.get("pattern"), str):
            _check_regex_counts(node["pattern"], field)
        if isinstance(node.get("patternProperties"), dict):
            for regex in node["patternProperties"]:
                _check_regex_counts(regex, field)
        for value in node.values():
            walk(value, depth + 1)
    walk(schema, 0)
    _check_ref_cycles(schema, field)


def _check_ref_cycles(schema, field: str) -> None:
    """Refuse a $ref chain that comes back to where it started through no part of a value (an
    object's property, an array's item): {"$ref": "#"}, or $defs a -> b -> a. Recursion through
    a part (a tree whose children are trees) is fine: each level is a value deeper."""
    def resolve(ref: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None  # only references inside the schema are followed
        node = schema
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def same_value(node):
        """The subschemas that describe the same value as `node` (its $ref target and its
        combinators' members)."""
        if not isinstance(node, dict):
            return []
        out = []
        if "$ref" in node:
            out.append(resolve(node["$ref"]))
        for key in _SAME_VALUE_KEYWORDS:
            value = node.get(key)
            out.extend(value if isinstance(value, list) else [value])
        return [n for n in out if isinstance(n, dict)]

    done: set[int] = set()

    def visit(node, path: list[int]) -> None:
        if id(node) in path:
            raise GrammarError(f"{field}: a $ref cycle that never reaches a value (the schema "
                               f"would be infinitely deep at one place)", field)
        if id(node) in done:
            return
        for child in same_value(node):
            visit(child, path + [id(node)])
        done.add(id(node))

    def every(node):
        if isinstance(node, dict):
            yield node
            for value in node.values():
                yield from every(value)
        elif isinstance(node, list):
            for value in node:
                yield from every(value)

    for node in every(schema):
        visit(node, [])


# The pieces of a grammar's text the bounds read, found by one regular expression (C, not a loop
# in Python: a 64 KiB grammar is read in about a millisecond): string literals and comments and
# (GBNF) character classes or (Lark) regexes, whose | and counts are not the grammar's; the |
# between alternatives, counts, and line ends (where a rule may start).
_STRING = r'"(?:\\.|[^"\\\n])*"'
_COUNT = r"\{\s*\d+\s*(?:,\s*\d*\s*)?\}"
_GBNF_PIECES = re.compile(rf'{_STRING}|\[(?:\\.|[^\]\\])*\]|#[^\n]*|\||{_COUNT}|\n')
_LARK_PIECES = re.compile(rf'{_STRING}|//[^\n]*|/(?:\\.|[^/\\\n])+/[imslux]*|\||{_COUNT}'
                          rf'|~\s*\d+(?:\s*\.\.\s*\d+)?|\n')


def check_grammar_text(text: str, field: str) -> None:
    """A grammar (llama.cpp's GBNF when it has "::=", else Lark) against BOUNDS: the
    alternatives of each rule and every count, read outside its literals. Run before the
    grammar is converted or compiled, so that a grammar past a bound costs nothing more."""
    gbnf = "::=" in text
    alternatives, rule = 0, "root" if gbnf else "start"
    if m := _RULE_START.match(text):
        rule = text[:m.end()].strip(" \t?!:=")
    for piece in (_GBNF_PIECES if gbnf else _LARK_PIECES).finditer(text):
        token = piece.group(0)
        if token == "\n":
            if m := _RULE_START.match(text, piece.end()):
                alternatives, rule = 0, text[piece.end():m.end()].strip(" \t?!:=")
        elif token == "|":
            alternatives += 1
            if alternatives + 1 > BOUNDS.max_alternatives:
                raise GrammarError(f"{field}: rule {rule!r} has more than "
                                   f"{BOUNDS.max_alternatives:,} alternatives "
                                   f"(docs/structured.md, bounds)", field)
        elif token[0] == "{":
            _check_regex_counts(token, field)
        elif token[0] == "~":
            for count in _TILDE_COUNT.match(token).groups():
                _check_count(count, "a count of", field)
        elif token[0] == "/" and not token.startswith("//"):
            _check_regex_counts(token, field)  # a Lark regex's own counts
        # (a string literal, a comment, a GBNF character class: nothing of the grammar's)


__all__ = ["BOUNDS", "ConstraintBounds", "check_grammar_text", "check_schema", "check_size"]
