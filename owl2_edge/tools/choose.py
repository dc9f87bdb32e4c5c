"""A per-tensor recipe chosen by measurement: `owl2 quantize SRC -o OUT --target-size SIZE`
(docs/quantize.md, "Recipes chosen by measurement").

1. Groups. The decoder's matrices fall into groups: token_embd, output, and for each band of
   layers (BANDS of them) each role: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up,
   ffn_down, and the visual route's attn_k and attn_v (the sidecar) as groups of their own.
2. Sensitivity. The full-precision source answers calibration image questions greedily. For
   each group and each type of the ladder, the source with that group alone at that type (its
   matrices re-encoded and swapped in the loaded pair, then back: Decoder.override_weights)
   reads the same prompts and answers (teacher forcing); the mean KL(source || lowered) over the
   answer positions is that group's cost at that type. A pass runs only the layers its group
   changes, from the source's hidden states kept at that band's input (Probe.open). Costs are
   kept on disk (kept_costs.py), and the source's answers with them (kept_answers.py). The
   questions are about pictures, so they decide the visual route's types as much as the text's.
   With estimate="scaled" only two types per group are measured (its lowest and SCALED_ANCHOR)
   and the others follow from their rounding errors (scale_costs).
3. Choice. Taking the costs to add up, a multiple-choice knapsack (dynamic programming over the
   budget in RESOLUTION steps, each size rounded up, so the choice always fits) picks one type
   per group with the least summed cost whose two files fit the budget.
4. Check. The chosen pair and the largest stock types that fit the budget (STOCK_RIVALS of them;
   llama.cpp's dry run tells their sizes without making them) are measured whole on check
   questions; the recipe is written only when its KL is below every one of theirs in 95 % of
   bootstrap redraws of those questions, else a stock type is kept (the largest that fits,
   unless the smaller one is surely lower): a recipe replaces a stock type only when it surely
   measures better.

Everything runs with the runtime's packages (no torch), on the device and threads the source was
loaded with. The cost is one encoding of the group and one teacher-forced pass of the
calibration questions per measured (group, type), on one load of the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from owl2_edge import _decoder, names, quant, recipe
from owl2_edge.decoder import Decoder
from owl2_edge.errors import ArgumentError
from owl2_edge.tools import compare, evaluate, kept_answers, kept_costs

BANDS = 4
ESTIMATES = ("measured", "scaled")
# --estimate scaled measures each group at its lowest type and at this one.
SCALED_ANCHOR = "Q4_K"
# The types each group may take, smallest first. IQ2_XS needs an importance matrix, and the IQ3
# type is only worth its place with one.
LADDER = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LADDER_IMATRIX = ("IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
STOCK_RIVALS = 2
RESOLUTION = 4096
# Calibration questions: generated pictures under a seed of their own, so that `owl2 eval`'s
# default questions (seed 0) and the benchmarks' held-out ones are other pictures.
CALIBRATION_SEED = 1000
DEFAULT_CALIBRATION = 16         # questions per question type (the CLI help of --calibration says it)
# The chosen pair and the stock types are compared on other questions than those the groups were
# measured on, and more of them (three passes in all): a choice fitted to a few answer positions
# must not be taken over a stock type on those same positions.
CHECK_SEED = 1001
CHECK_PER_TYPE = 48
# The recipe replaces the stock types only when its check KL is lower in this share of
# BOOTSTRAP redraws of the check questions: at a few 1e-6 nats the mean of a few hundred
# positions is one position's luck, and the stock type is the safer bet.
CONFIDENCE = 0.95
BOOTSTRAP = 2000
GGUF_ALIGNMENT = 32              # each tensor's data starts on this boundary (GGUF's default)
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")

# progress(stage, done, total), as quantize's
Progress = Callable[[str, int, int], None]


@dataclass
class Group:
    name: str
    keys: list[str]
    pattern: str                   # the --tensor-type pattern that names exactly its matrices
    cost: dict[str, float] = field(default_factory=dict)   # type -> measured mean KL
    size: dict[str, int] = field(default_factory=dict)     # type -> bytes of its matrices
    # The first layer its matrices change: its passes start there, from the source's hidden
    # states (token_embd: 0, output: n_layer, the final norm's input).
    first_layer: int = 0


@dataclass
class Choice:
    target_bytes: int
    groups: list[Group]
    types: dict[str, str]              # group name -> chosen type
    predicted_kl: float
    recipe_bytes: int
    recipe_kl: float
    rivals: dict[str, dict]            # stock type -> {"bytes", "kl"}
    winner: str                        # "recipe" or the stock type kept
    questions: int
    positions: int
    seconds: dict[str, float]
    estimate: str = "measured"
    check_questions: int = 0           # what recipe_kl and the rivals' KL are measured on
    check_positions: int = 0
    kept_costs: int = 0                # group costs taken from earlier runs (kept_costs.py)
    passes: int = 0                    # group costs measured by this run

    def tensor_types(self) -> dict[str, str]:
        """Matrix key -> type, for every matrix of the chosen recipe."""
        return {k: self.types[g.name] for g in self.groups for k in g.keys}

    def record(self) -> dict:
        """What the manifest keeps of the choice."""
        return {"target_bytes": self.target_bytes, "winner": self.winner,
                "estimate": self.estimate,
                "groups": self.types, "predicted_kl": self.predicted_kl,
                "recipe_bytes": self.recipe_bytes, "recipe_kl": self.recipe_kl,
                "rivals": self.rivals, "questions": self.questions,
                "positions": self.positions, "check_questions": self.check_questions,
                "check_positions": self.check_positions, "kept_costs": self.kept_costs,
                "passes": self.passes, "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}


# --- Groups --------------------------------------------------------------------------------------

def groups_of(pair: Sequence[recipe.Matrix], n_layer: int, bands: int = BANDS) -> list[Group]:
    bands = max(1, min(bands, n_layer))
    edges = [round(b * n_layer / bands) for b in range(bands + 1)]

    def band(i: int) -> str:
        b = next(b for b in range(bands) if edges[b] <= i < edges[b + 1])
        lo, hi = edges[b], edges[b + 1] - 1
        return str(lo) if lo == hi else f"{lo}-{hi}"

    groups: dict[str, Group] = {}
    layers: dict[str, list[str]] = {}
    for m in pair:
        prefix = recipe.SIDECAR_PREFIX if m.sidecar else ""
        match = _LAYER_TENSOR.match(m.name)
        if match is None:
            name = prefix + m.name.removesuffix(".weight")
            pattern = "^" + re.escape(m.key) + "$"
            # token_embd changes the first layer's input; output only the head's
            first = 0 if re.match(recipe.TOKEN_EMBD_PATTERN, m.name) else n_layer
        else:
            name = f"{prefix}blk.{band(int(match.group(1)))}.{match.group(2)}"
            layers.setdefault(name, []).append(match.group(1))
            pattern = (f"^{re.escape(prefix)}blk\\.({'|'.join(layers[name])})\\."
                       f"{match.group(2)}\\.weight$")
            first = min(int(i) for i in layers[name])
        g = groups.setdefault(name, Group(name, [], pattern, first_layer=first))
        g.keys.append(m.key)
        g.pattern = pattern
    return list(groups.values())


# --- Measuring ------------------------------------------------------------------------------------

@dataclass
class _Question:
    runs: list                     # token id lists and image embeddings, as Decoder.eval_runs
    n_answer: int                  # answer positions (the reference's continuation)
    logprobs: np.ndarray           # the source's, float64 [n_answer, n_vocab]
    # The source's hidden states at the input of each layer a pass starts from, float32
    # [positions, n_embd] (Probe.open): a group's pass runs only its layers and those after.
    states: dict[int, np.ndarray] = field(default_factory=dict)

    @functools.cached_property
    def routes(self) -> np.ndarray:
        """Each position's route: its run's (eval_runs routes picture embeddings visual)."""
        return np.concatenate([np.full(len(run), names.VISUAL_ROUTE if isinstance(run, np.ndarray)
                                       else names.TEXT_ROUTE, np.int32) for run in self.runs])


class Probe:
    """The calibration questions as the source answered them, and the KL of any pair on them."""

    def __init__(self, owl, items: Sequence[evaluate.Item], kept: Path | None = None,
                 fresh: bool = False):
        """The source (owl) answers the items; kept: the file its answers are kept in
        (kept_answers.py), read instead of answering when it holds them (unless fresh)."""
        answered = None if kept is None or fresh else kept_answers.load(kept)
        if answered is None:
            answered = self._answer(owl, items)
            if kept is not None and answered:
                kept_answers.save(kept, answered)
        self.questions = [_Question(runs, n_answer, logprobs.astype(np.float64))
                          for runs, n_answer, logprobs in answered]
        if not self.questions:
            raise ArgumentError("no calibration question got an answer to measure")
        self.positions = sum(q.n_answer for q in self.questions)
        self.n_ctx = max(64, max(sum(len(r) for r in q.runs) for q in self.questions))
        # The passes run where and as the source was loaded (device, threads, KV type...).
        self.options = dataclasses.replace(owl.options, n_ctx=self.n_ctx)

    @staticmethod
    def _answer(owl, items) -> list[kept_answers.Question]:
        """Each item the source answered, as (runs, answer positions, log-probabilities)."""
        out = []
        for item, ref in zip(items, compare.reference_pass(owl, items)):
            if not ref.continuation:
                continue
            prompt, _ = compare._prompt(item)
            runs, text = [], []
            for t in owl.tokenize(prompt) + list(ref.continuation):
                if t == names.IMAGE_TOKEN_ID:
                    if text:
                        runs.append(text)
                    runs.append(ref.embeds)
                    text = []
                else:
                    text.append(t)
            if text:
                runs.append(text)
            out.append((runs, len(ref.continuation), ref.logprobs))
        return out

    def kl(self, base: Path, mam: Path) -> float:
        """Mean KL(source || this pair) over every answer position."""
        return float(self.kl_sums(base, mam).sum() / self.positions)

    def kl_sums(self, base: Path, mam: Path) -> np.ndarray:
        """KL(source || this pair) summed over each question's answer positions."""
        with Decoder(base, mam, self.options) as dec:
            return self._sums(dec)

    def open(self, base: Path, mam: Path, first_layers: Sequence[int] = ()) -> Decoder:
        """The source pair loaded for kl_lowered (the caller closes it), and for each question
        the source's hidden states at the input of each of `first_layers` kept (one pass of the
        questions; in memory: questions x positions x n_embd x 4 bytes per layer, about 0.3 GB
        at 7B with 4 bands and 16 questions per type, docs/quantize.md)."""
        dec = Decoder(base, mam, self.options)
        layers = sorted(set(first_layers) - {0})
        try:
            if layers:
                for q in self.questions:
                    dec.clear_sequence(0)
                    q.states = dec.eval_capturing(q.runs, layers)[1]
        except BaseException:
            dec.close()
            raise
        return dec

    def drop_states(self) -> None:
        """Give back the memory of the states open() kept."""
        for q in self.questions:
            q.states = {}

    def kl_lowered(self, dec: Decoder, matrices: dict, first_layer: int = 0) -> float:
        """Mean KL(source || the loaded pair with `matrices` replaced, Decoder.override_weights),
        the pair as it was afterwards. first_layer: the first layer the matrices change; the
        passes start there from the states open() kept (the layers before compute what the
        source computed)."""
        dec.override_weights(matrices)
        try:
            return float(self._sums(dec, first_layer).sum() / self.positions)
        finally:
            dec.clear_overrides()

    def _sums(self, dec: Decoder, first_layer: int = 0) -> np.ndarray:
        sums = np.zeros(len(self.questions))
        for i, q in enumerate(self.questions):
            dec.clear_sequence(0)
            if first_layer and first_layer in q.states:
                logits = dec.eval_from_layer(q.states[first_layer], q.routes, first_layer)
            else:
                logits = dec.eval_runs(q.runs, all_logits=True)
            rows = compare._log_softmax(logits[len(logits) - q.n_answer - 1:-1])
            p = q.logprobs
            sums[i] = (np.exp(p) * (p - rows.astype(np.float64))).sum(-1).clip(min=0).sum()
        return sums

    def surely_lower(self, a: np.ndarray, b: np.ndarray) -> float:
        """How often pair a's mean KL is below pair b's when the questions are drawn again
        (BOOTSTRAP resamples, a fixed seed): both measured by kl_sums on these questions."""
        counts = np.array([q.n_answer for q in self.questions])
        draws = np.random.default_rng(0).integers(0, len(counts), (BOOTSTRAP, len(counts)))
        positions = counts[draws].sum(1)
        return float(np.mean(a[draws].sum(1) / positions < b[draws].sum(1) / positions))


def _aligned(n: int) -> int:
    return -(-n // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


class _Workbench:
    """Pairs written from the source with some matrices at other types, in a scratch folder, and
    the same matrices' encodings for a loaded pair (Decoder.override_weights)."""

    def __init__(self, base: Path, mam: Path, scratch: Path, importance):
        self.base, self.mam, self.scratch = base, mam, scratch
        self.importance = importance
        self._weights = recipe.importance_by_key(importance)  # by key, computed once
        self._tensors: dict[bool, dict] = {}

    def encoded(self, types: dict[str, int]) -> dict[tuple[str, bool], tuple[int, np.ndarray]]:
        """{(name, sidecar's): (type, bytes)} for the keys given, encoded from the source as
        retype_gguf encodes them (the same routine and importance): a recipe measured in memory
        is the recipe written."""
        import gguf
        out = {}
        for key, ggml_type in types.items():
            sidecar = key.startswith(recipe.SIDECAR_PREFIX)
            name = key[len(recipe.SIDECAR_PREFIX):] if sidecar else key
            if sidecar not in self._tensors:
                self._tensors[sidecar] = {t.name: t for t in gguf.GGUFReader(
                    self.mam if sidecar else self.base).tensors}
            data = quant.encode(quant.decode(self._tensors[sidecar][name]), name, ggml_type,
                                self._weights.get(key))
            out[(name, sidecar)] = (int(ggml_type), np.ascontiguousarray(data).view(np.uint8))
        return out

    def pair(self, types: dict[str, int]) -> tuple[Path, Path]:
        """The source pair with types[key] for the keys given (the source's files where none)."""
        out = []
        for path, sidecar in ((self.base, False), (self.mam, True)):
            prefix = recipe.SIDECAR_PREFIX if sidecar else ""
            mine = {k[len(prefix):]: t for k, t in types.items()
                    if k.startswith(recipe.SIDECAR_PREFIX) == sidecar}
            if not mine:
                out.append(path)
                continue
            weights = None if self.importance is None else (
                self.importance.for_sidecar() if sidecar else self.importance.for_base())
            target = self.scratch / ("mam.gguf" if sidecar else "base.gguf")
            recipe.retype_gguf(path, path, target, mine, weights)
            out.append(target)
        return out[0], out[1]


# --- Choosing -------------------------------------------------------------------------------------

def generated_sets(per_type: int = DEFAULT_CALIBRATION
                   ) -> tuple[list[evaluate.Item], list[evaluate.Item]]:
    """The built-in calibration questions (per_type of each question type) and check questions."""
    return (evaluate.generated_items(per_type, CALIBRATION_SEED),
            evaluate.generated_items(CHECK_PER_TYPE, CHECK_SEED))


def _stock_bytes(pair: Sequence[recipe.Matrix], fixed: int, planned: dict[str, int]) -> int:
    """The pair's bytes at a stock type from its planned base types: each sidecar matrix takes
    the base's type of the same name (quant.write_sidecar), the rest stays as it is."""
    return fixed + sum(_aligned(m.bytes_at(planned.get(m.name, m.type))) for m in pair)


def _check_estimate(estimate: str) -> None:
    if estimate not in ESTIMATES:
        raise ArgumentError(f"--estimate must be one of {', '.join(ESTIMATES)}, not {estimate!r}")


def _anchors(g: Group) -> list[str]:
    """The types --estimate scaled measures for a group: its lowest and SCALED_ANCHOR."""
    lowest = next(iter(g.size))
    return [lowest] + ([SCALED_ANCHOR] if SCALED_ANCHOR in g.size and SCALED_ANCHOR != lowest
                       else [])


def scale_costs(groups: Sequence[Group], base: Path, mam: Path,
                importance: dict[str, np.ndarray]) -> None:
    """Fill each group's costs at the types not measured from their rounding errors, the sum
    over the group's matrices of E[x_j^2] (W_ij - round(W)_ij)^2 (E[x_j^2] from the importance
    matrix; 1 where it has no entry), which is the squared error of the matrices' outputs. Above
    the highest measured type the cost scales with the error (KL grows with it to first order);
    between two measured types it is interpolated on log scales: a group can break below some
    type (the demo model's token_embd: KL 0.6 at Q2_K, 4e-8 at Q3_K), which no single
    measurement scales to."""
    import gguf
    values = {}
    for path, prefix in ((base, ""), (mam, recipe.SIDECAR_PREFIX)):
        for t in gguf.GGUFReader(path).tensors:
            values[prefix + t.name] = t
    for g in groups:
        errors = {t: 0.0 for t in g.size}
        for key in g.keys:
            w = quant.decode(values[key])
            weights = importance.get(key)
            for t in g.size:
                rounded = quant.encode(w, key, recipe.TENSOR_TYPES[t], weights)
                back = _decoder.dequantize(rounded, int(recipe.TENSOR_TYPES[t]), w.shape[-1])
                sq = np.square(back.reshape(w.shape) - w, dtype=np.float64).sum(axis=0)
                errors[t] += float(sq @ (weights if weights is not None else np.ones_like(sq)))
        points = sorted(((max(errors[t], 1e-30), max(c, 1e-30)) for t, c in g.cost.items()),
                        reverse=True)   # largest error first
        for t in g.size:
            if t in g.cost:
                continue
            e = max(errors[t], 1e-30)
            if len(points) == 1 or e <= points[-1][0]:
                e0, c0 = points[-1]
                g.cost[t] = c0 * e / e0
            else:  # from the lowest type's cost up, or between the two measured types
                (e1, c1), (e2, c2) = points[0], points[-1]
                if e >= e1:
                    g.cost[t] = c1 * e / e1
                else:
                    f = (np.log(e1) - np.log(e)) / (np.log(e1) - np.log(e2))
                    g.cost[t] = float(np.exp(np.log(c1) + f * (np.log(c2) - np.log(c1))))


def knapsack(groups: Sequence[Group], capacity: int, resolution: int = RESOLUTION
             ) -> dict[str, str] | None:
    """Group name -> type with the least summed cost whose summed size is at most `capacity`
    bytes; None when even the smallest types do not fit."""
    if capacity <= 0:
        return None
    unit = max(1, math.ceil(capacity / resolution))
    slots = capacity // unit
    best = np.full(slots + 1, np.inf)
    best[0] = 0.0
    picks = []
    for g in groups:
        options = list(g.cost)
        new = np.full(slots + 1, np.inf)
        pick = np.full(slots + 1, -1, dtype=np.int32)
        for i, t in enumerate(options):
            w = math.ceil(_aligned(g.size[t]) / unit)
            if w > slots:
                continue
            shifted = np.full(slots + 1, np.inf)
            shifted[w:] = best[:slots + 1 - w] + g.cost[t]
            better = shifted < new
            new[better], pick[better] = shifted[better], i
        best = new
        picks.append((options, pick))
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    chosen = {}
    for g, (options, pick) in zip(reversed(groups), reversed(picks)):
        t = options[pick[end]]
        chosen[g.name] = t
        end -= math.ceil(_aligned(g.size[t]) / unit)
    return chosen


def pair_bytes(folder_or_paths) -> int:
    return sum(Path(p).stat().st_size for p in folder_or_paths)


def choose(src: Path, manifest, target_bytes: int, owl, importance=None,
           items: Sequence[evaluate.Item] | None = None, progress: Progress | None = None, estimate: str = "measured",
           check_items: Sequence[evaluate.Item] | None = None, keep: bool = True,
           fresh: bool = False) -> Choice:
    """Measure and choose (module docstring). owl: the source folder loaded (Owl2), for the
    reference answers and the pictures' embeddings. estimate: "measured" (every type of every
    group a pass of its own) or "scaled" (two passes per group, scale_costs). items: the
    calibration questions; check_items: those the chosen pair and the stock types are measured
    on (default: with generated calibration, CHECK_PER_TYPE others; else the same items).
    keep: each group cost measured is kept on disk, and a cost kept by an earlier run on the
    same source, importance matrix and calibration is taken instead of measured again
    (kept_costs.py); fresh: measure every one again (and keep the new ones)."""
    _check_estimate(estimate)
    from owl2_edge.tools.quantize import quantize_decoder

    report = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    if items is None:
        items, check_items = generated_sets()
    else:
        items = list(items)
        check_items = items if check_items is None else list(check_items)
    base, mam = src / manifest.decoder_file, src / manifest.mam_file
    pair = recipe.matrices(base, mam)
    groups = groups_of(pair, manifest.decoder.n_layer)
    by_key = {m.key: m for m in pair}
    fixed = pair_bytes((base, mam)) - sum(_aligned(m.bytes_at(m.type)) for m in pair)
    weights = recipe.importance_by_key(importance)
    ladder = LADDER_IMATRIX if importance is not None else LADDER
    for g in groups:
        for t in ladder:
            ms = [by_key[k] for k in g.keys]
            if all(m.fits(recipe.TENSOR_TYPES[t]) for m in ms) and (
                    t not in recipe.NEEDS_IMATRIX or all(k in weights for k in g.keys)):
                g.size[t] = sum(m.bytes_at(recipe.TENSOR_TYPES[t]) for m in ms)
    smallest = fixed + sum(_aligned(min(g.size.values())) for g in groups if g.size)
    if any(not g.size for g in groups):
        bad = next(g for g in groups if not g.size)
        raise ArgumentError(f"no type of the ladder fits {bad.name}'s rows")
    if target_bytes < smallest:
        raise ArgumentError(f"the target {target_bytes} bytes is below the smallest recipe "
                            f"this chooser can write, {smallest} bytes")

    # The source's answers, kept with the costs: a second size reads them back.
    source = kept_costs.source_digest(manifest, [base, mam])

    def answers(its):
        return kept_answers.answers_path(source, its, owl.options, evaluate.DEFAULT_MAX_TOKENS) \
            if keep else None
    probe = Probe(owl, items, answers(items), fresh)
    check = probe if check_items is items else Probe(owl, check_items, answers(check_items),
                                                     fresh)
    seconds = {"reference": time.perf_counter() - started}
    kept = kept_costs.KeptCosts.open(source, kept_costs.importance_digest(importance),
                                     kept_costs.probe_digest(probe.questions, probe.options),
                                     fresh) if keep else None
    with tempfile.TemporaryDirectory(prefix=".owl2-choose-", dir=src.parent) as scratch:
        bench = _Workbench(base, mam, Path(scratch), importance)
        t0 = time.perf_counter()
        measured = {g.name: list(g.size) if estimate == "measured" else _anchors(g)
                    for g in groups}
        taken = 0
        for g in groups:
            for t in measured[g.name]:
                if kept is not None and (cost := kept.get(g, t)) is not None:
                    g.cost[t] = cost
                    taken += 1
        # What is left to measure, the bar (and its time left) counting only that.
        todo = [(g, t) for g in groups for t in measured[g.name] if t not in g.cost]
        report("sensitivity", 0, len(todo))
        # One load of the source; each pass lowers its group in memory and puts it back.
        # Each pass from its group's first layer: the source's states there are kept at open.
        with probe.open(base, mam, [g.first_layer for g, _ in todo]) if todo \
                else contextlib.nullcontext() as source:
            for done, (g, t) in enumerate(todo, 1):
                g.cost[t] = probe.kl_lowered(source, bench.encoded(
                    {k: recipe.TENSOR_TYPES[t] for k in g.keys}), g.first_layer)
                if kept is not None:
                    kept.put(g, t, g.cost[t])  # at once: a run cut short keeps what it measured
                report("sensitivity", done, len(todo))
        probe.drop_states()  # the check needs none of them
        steps = len(todo)
        seconds["sensitivity"] = time.perf_counter() - t0
        seconds["per_pass"] = seconds["sensitivity"] / max(steps, 1)
        if estimate == "scaled":
            t0 = time.perf_counter()
            scale_costs(groups, base, mam, weights)
            seconds["rounding_errors"] = time.perf_counter() - t0

        types = knapsack(groups, target_bytes - fixed)
        assert types is not None  # the smallest recipe fits (checked above)
        predicted = sum(g.cost[types[g.name]] for g in groups)
        t0 = time.perf_counter()
        chosen = {k: recipe.TENSOR_TYPES[types[g.name]] for g in groups for k in g.keys}
        recipe_pair = bench.pair(chosen)
        recipe_bytes, recipe_sums = pair_bytes(recipe_pair), check.kl_sums(*recipe_pair)
        recipe_kl = float(recipe_sums.sum() / check.positions)
        if recipe_bytes > target_bytes:  # the sizes are exact; this would be a bug here
            raise AssertionError(f"recipe of {recipe_bytes} bytes over {target_bytes}")

        rivals, rival_sums = {}, {}
        report("stock types", 0, STOCK_RIVALS)
        base_importance = importance.for_base() if importance is not None else None
        for qt in quant.QUANT_TYPES.values():
            if len(rivals) == STOCK_RIVALS:
                break
            if qt.name in quant.FLOAT_TYPES or (qt.needs_imatrix and importance is None):
                continue
            if _stock_bytes(pair, fixed, quant.planned_types(base, qt, base_importance)) \
                    > target_bytes:
                continue  # llama.cpp's dry run says it cannot fit: no need to make it
            work = Path(scratch) / f"stock-{qt.name}"
            work.mkdir()
            files = quantize_decoder(src, manifest, work, qt, importance, False,
                                     lambda *a: None)
            paths = [work / f for f in files]
            size = pair_bytes(paths)
            if size <= target_bytes:
                sums = rival_sums[qt.name] = check.kl_sums(*paths)
                rivals[qt.name] = {"bytes": size, "kl": float(sums.sum() / check.positions),
                                   "recipe_lower": check.surely_lower(recipe_sums, sums)}
                report("stock types", len(rivals), STOCK_RIVALS)
            shutil.rmtree(work)
        seconds["check"] = time.perf_counter() - t0
    # The recipe is written only if it is lower than every stock type that fits, and surely so:
    # in CONFIDENCE of the resampled check sets. Else a stock type stays: the largest that fits,
    # unless a smaller one is surely lower than it by the same rule.
    kept = next(iter(rivals), None)
    for name in rivals:
        if check.surely_lower(rival_sums[name], rival_sums[kept]) >= CONFIDENCE:
            kept = name
    sure = all(r["recipe_lower"] >= CONFIDENCE for r in rivals.values())
    winner = kept if kept is not None and not sure else "recipe"
    seconds["total"] = time.perf_counter() - started
    return Choice(target_bytes, groups, types, predicted, recipe_bytes, recipe_kl, rivals,
                  winner, len(probe.questions), probe.positions, seconds, estimate,
                  len(check.questions), check.positions, taken, steps)


def quantize_to_target(src, out, target_bytes: int, load: Callable, importance=None,
                       vision: Sequence[str] | None = None, force: bool = False,
                       items: Sequence[evaluate.Item] | None = None,
                       progress: Progress | None = None,
                       estimate: str = "measured",
                       check_items: Sequence[evaluate.Item] | None = None,
                       keep: bool = True, fresh: bool = False):
    """Choose a recipe for `target_bytes` (both GGUF files) and write `out` with it; returns
    (the new Manifest, the Choice). load(path) opens a folder as an Owl2 (the caller's runtime
    options). The output folder is checked before anything is measured."""
    from owl2_edge.model_dir import check_output_folder
    from owl2_edge.owl2 import Owl2
    from owl2_edge.tools.quantize import quantize_folder

    src, out = Path(src), Path(out)
    _check_estimate(estimate)
    manifest = Owl2.check_folder(src)
    if manifest.quant not in quant.FLOAT_TYPES:
        raise ArgumentError(f"a recipe is measured against full precision: {src} is "
                            f"{manifest.quant}; start from an F16, BF16 or F32 folder")
    if out.exists() and out.resolve() == src.resolve():
        raise ArgumentError("the output folder is the source folder; choose another one")
    check_output_folder(out, force)
    with load(src) as owl:
        choice = choose(src, manifest, target_bytes, owl, importance, items, progress,
                        estimate, check_items, keep, fresh)
    overrides = [] if choice.winner != "recipe" else \
        [recipe.Override(g.pattern, choice.types[g.name]) for g in choice.groups]
    new = quantize_folder(src, out, label_type(choice), vision, importance, force=force,
                          progress=progress, overrides=overrides, chosen=choice.record())
    return new, choice


def label_type(choice: Choice) -> str:
    """The stock type whose mix the written folder starts from (its manifest's quant): the kept
    one, else the largest stock type that fit, else the smallest stock type."""
    if choice.winner != "recipe":
        return choice.winner
    if choice.rivals:
        return next(iter(choice.rivals))
    return "Q2_K"


def target_from(target_size: str | None, target_bpw: float | None, src: Path, manifest) -> int:
    """Bytes of both GGUF files from --target-size or --target-bpw (bits per weight of the
    pair: all its tensors' values, as llama.cpp counts its bits per weight)."""
    from owl2_edge.disk_cache import parse_size
    if (target_size is None) == (target_bpw is None):
        raise ArgumentError("give one of --target-size and --target-bpw")
    if target_size is not None:
        return parse_size(target_size, "--target-size")
    if not (isinstance(target_bpw, (int, float)) and 1.0 <= target_bpw <= 32.0):
        raise ArgumentError(f"--target-bpw must be between 1 and 32, not {target_bpw}")
    return int(target_bpw * pair_weights(src, manifest) / 8)


def pair_weights(src: Path, manifest) -> int:
    import gguf
    return sum(int(np.prod([int(d) for d in t.shape]))
               for f in (manifest.decoder_file, manifest.mam_file)
               for t in gguf.GGUFReader(src / f).tensors)


def describe(choice: Choice) -> list[str]:
    """The lines `owl2 quantize` prints about a choice."""
    lines = [f"{'group':<28} {'type':<8} {'KL alone':>10}"]
    for g in choice.groups:
        t = choice.types[g.name]
        lines.append(f"{g.name:<28} {t:<8} {g.cost[t]:>10.2e}")
    lines.append(f"groups measured on {choice.questions} questions ({choice.positions} answer "
                 f"positions); recipe and stock types checked on {choice.check_questions} "
                 f"({choice.check_positions} positions)")
    lines.append(f"recipe: {choice.recipe_bytes} bytes, KL {choice.recipe_kl:.3e} "
                 f"(the groups' sum: {choice.predicted_kl:.3e})")
    for name, r in choice.rivals.items():
        lines.append(f"stock {name}: {r['bytes']} bytes, KL {r['kl']:.3e} (the recipe lower in "
                     f"{r['recipe_lower']:.0%} of resampled checks)")
    lines.append("kept: the recipe" if choice.winner == "recipe" else
                 f"kept: stock {choice.winner} (the recipe did not measure surely better)")
    lines.append(f"chosen in {choice.seconds['total']:.1f} s: {choice.passes} passes measured"
                 + (f" ({choice.seconds['per_pass']:.2f} s each)" if choice.passes else "")
                 + (f", {choice.kept_costs} group costs kept from an earlier run (--fresh "
                    f"measures them again)" if choice.kept_costs else "")
                 + (", the other types scaled by rounding error" if choice.estimate == "scaled"
                    else ""))
    return lines

