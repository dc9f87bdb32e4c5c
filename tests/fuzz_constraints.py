"""A fuzzer of the constraints a client can send (issue 36): JSON schemas and GBNF / Lark
grammars, generated and mutated, hostile ones among them (deep nesting, $ref cycles, huge
counts and enums, regex features, many alternatives, junk), each asked through the Python API
and a sample through the server. Every one must end in a refusal naming its field (GrammarError,
HTTP 400) or an answer within a time bound; an answer that ends by its grammar ("stop") must
validate against its schema. Anything else (another exception, a 5xx, a stream that ends without
[DONE] or an error event, a slow one, a slot left busy) is a finding.

    constraints(n, seed) -> [(kind, value)]   kind "json_schema" or "grammar"
"""

from __future__ import annotations

import json
import random
import string

# --- JSON schemas ----------------------------------------------------------------------------------

_REGEXES = [r"^[a-z]{2,5}$", r"^\d{3}-\d{4}$", r"(ab|cd)+", r"^[A-Z][a-z]*$", r"x{2}y?",
            r"^(?!bad).*$", r"\p{L}+", r"[", r"a{99999}", r"a{0,20000}", r"(a|b|c|d){1,3}",
            r"^.{0,10}$", r"\bword\b", r"[\u00e9-\u00ff]+", r"(?i)abc", r"a**", r"^$"]
_HUGE = [10**9, 10**6, 50_000, 10_001, 2**63, -1, 0, 3, 1.5, True, "7", None]


def _leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "null", "enum", "const"])
    if kind == "string":
        out = {"type": "string"}
        if rng.random() < 0.3:
            out["maxLength"] = rng.choice([0, 1, 5, 12, 10**9])
        if rng.random() < 0.2:
            out["minLength"] = rng.choice([0, 1, 3, 10**9, 50_000])
        if rng.random() < 0.25:
            out["pattern"] = rng.choice(_REGEXES)
        return out
    if kind in ("integer", "number"):
        out = {"type": kind}
        if rng.random() < 0.5:
            lo = rng.randint(-100, 100)
            out.update(minimum=lo, maximum=lo + rng.randint(0, 200))
        return out
    if kind == "enum":
        n = rng.choice([1, 2, 5, 50, 3000])
        return {"enum": [rng.choice([f"w{i}", i, None, True, 1.5]) for i in range(n)]}
    if kind == "const":
        return {"const": rng.choice(["x", 3, None, [1, 2], {"a": 1}])}
    return {"type": kind}


def random_schema(rng: random.Random, depth: int = 0, max_depth: int = 4) -> dict:
    if depth >= max_depth or rng.random() < 0.3:
        return _leaf(rng)
    kind = rng.choice(["object", "object", "array", "anyOf", "oneOf", "allOf"])
    if kind == "object":
        keys = rng.sample(["a", "b", "name", "n", "tags", "é", "x y"], rng.randint(0, 4))
        props = {k: random_schema(rng, depth + 1, max_depth) for k in keys}
        out = {"type": "object", "properties": props,
               "required": [k for k in keys if rng.random() < 0.7]}
        if rng.random() < 0.6:
            out["additionalProperties"] = False
        if rng.random() < 0.1:
            out["minProperties"] = rng.choice(_HUGE)
        return out
    if kind == "array":
        out = {"type": "array", "items": random_schema(rng, depth + 1, max_depth)}
        if rng.random() < 0.6:
            out["maxItems"] = rng.choice([0, 1, 3])
        if rng.random() < 0.2:
            out["minItems"] = rng.choice(_HUGE)
        return out
    return {kind: [random_schema(rng, depth + 1, max_depth) for _ in range(rng.randint(1, 3))]}


def hostile_schema(rng: random.Random) -> dict:
    pick = rng.randrange(9)
    if pick == 0:  # deep nesting
        depth, node = rng.choice([10, 63, 70, 200]), {"type": "string"}
        for _ in range(depth):
            node = {"type": "array", "items": node, "maxItems": 1}
        return node
    if pick == 1:
        return {"$ref": "#"}
    if pick == 2:  # a $defs cycle, with or without a part between
        through_part = rng.random() < 0.5
        a = ({"type": "object", "properties": {"next": {"$ref": "#/$defs/b"}}}
             if through_part else {"$ref": "#/$defs/b"})
        return {"$defs": {"a": a, "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
                "$ref": "#/$defs/a"}
    if pick == 3:
        return {"$ref": rng.choice(["#/nowhere", "http://127.0.0.1/x.json", "#/$defs/%zz", 5])}
    if pick == 4:
        return {"type": "string", "pattern": f"^a{{{rng.choice(_HUGE[:5])}}}$"}
    if pick == 5:
        return {"enum": [f"w{i}" for i in range(rng.choice([10, 5000, 20000]))]}
    if pick == 6:
        return {"type": "array", "items": {"type": "string"},
                rng.choice(["minItems", "maxItems", "minContains"]): rng.choice(_HUGE)}
    if pick == 7:
        return {"type": rng.choice(["objekt", 5, ["string", "null"], []])}
    return {"properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]}


def mutate(rng: random.Random, value):
    """A copy of a JSON value with one node replaced, dropped or retyped."""
    value = json.loads(json.dumps(value))
    nodes = []

    def walk(node, parent, key):
        nodes.append((parent, key))
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, node, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, node, i)
    walk(value, None, None)
    parent, key = rng.choice(nodes)
    junk = rng.choice([None, -1, 10**12, "", "x" * 100, [], {}, True, 1.5, {"type": "x"},
                       "\ud800", "#", {"$ref": "#"}])
    if parent is None:
        return junk
    if isinstance(parent, dict) and rng.random() < 0.3:
        parent.pop(key)
    else:
        parent[key] = junk
    return value


# --- grammars --------------------------------------------------------------------------------------

def _literal(rng: random.Random) -> str:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 4)))
    return json.dumps(word)


def random_gbnf(rng: random.Random) -> str:
    names = ["root"] + [f"r{i}" for i in range(rng.randint(0, 4))]
    lines = []
    for k, name in enumerate(names):
        alts = []
        for _ in range(rng.randint(1, 4)):
            parts = []
            for _ in range(rng.randint(1, 3)):
                choice = rng.random()
                if choice < 0.5:
                    parts.append(_literal(rng))
                elif choice < 0.7:
                    parts.append(rng.choice(["[a-z]", "[0-9]+", "[^\\n]", "[a-c]?", "[x]*"]))
                elif k + 1 < len(names):
                    parts.append(rng.choice(names[k + 1:]))
                else:
                    parts.append(_literal(rng))
                if rng.random() < 0.15:
                    parts[-1] += rng.choice(["{2}", "{1,3}", "{0,}", "{100000}", "*", "+", "?"])
            alts.append(" ".join(parts))
        lines.append(f"{name} ::= " + " | ".join(alts))
    return "\n".join(lines)


def hostile_grammar(rng: random.Random) -> str:
    pick = rng.randrange(8)
    if pick == 0:
        n = rng.choice([500, 999, 1001, 5000])
        return "root ::= " + " | ".join(f'"w{i}"' for i in range(n))
    if pick == 1:
        return f'root ::= "a"{{{rng.choice([10, 10_000, 10_001, 1_000_000])}}}'
    if pick == 2:
        return "root ::= root \"a\" | \"b\""  # left recursion
    if pick == 3:
        return "root ::= missing"
    if pick == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 200)))
    if pick == 5:
        return "start: " + " | ".join(f'"w{i}"' for i in range(rng.choice([10, 1500])))
    if pick == 6:
        return 'start: /' + rng.choice(["a{0,99999}", "(a|b)*", "[", "\\d+", "x{3}"]) + '/'
    return "root ::= " + "(" * 50 + '"x"' + ")" * 50


def constraints(n: int, seed: int) -> list[tuple[str, object]]:
    """n constraints: a third generated schemas, a sixth hostile schemas, a sixth mutated ones,
    a sixth generated grammars, a sixth hostile or mutated grammars."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        slot = i % 6
        if slot in (0, 1):
            out.append(("json_schema", random_schema(rng)))
        elif slot == 2:
            out.append(("json_schema", hostile_schema(rng)))
        elif slot == 3:
            out.append(("json_schema", mutate(rng, random_schema(rng))))
        elif slot == 4:
            out.append(("grammar", random_gbnf(rng)))
        else:
            text = hostile_grammar(rng) if rng.random() < 0.6 else random_gbnf(rng)
            if rng.random() < 0.3:  # a character dropped, doubled or swapped
                k = rng.randrange(max(1, len(text)))
                text = rng.choice([text[:k] + text[k + 1:], text[:k] + text[k:k + 1] * 2 +
                                   text[k + 1:], text[:k] + rng.choice("|()\"[]{}:=") +
                                   text[k + 1:]])
            out.append(("grammar", text))
    return out
