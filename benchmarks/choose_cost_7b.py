"""What `owl2 quantize --target-size` would take at the release's 7B shape, from its measured
parts (docs/quantize.md, "Recipes chosen by measurement").

Builds (once, cached) the 7B shape with random weights at F16 (`owl2 bench --shape`'s cache),
then times what the chooser does, on this machine: the source's reference pass per question, the
pass that keeps the hidden states at each band's input, one pair written whole (the check writes
the chosen recipe once), and for groups of each band and size one measured pass (the group
encoded at the type, swapped into the loaded source, the calibration questions read with teacher
forcing from the group's first layer on). The estimate for the whole choice multiplies by the
chooser's counts (groups x ladder passes with --estimate measured, groups x 2 with scaled, plus
its rounding errors; the default calibration and check questions; two stock types quantized and
checked), each group's passes timed as those of the timed group that starts at the same layer.

    python benchmarks/choose_cost_7b.py [--threads 2] [--questions 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from owl2_edge import recipe
from owl2_edge.model_dir import Manifest
from owl2_edge.owl2 import Owl2
from owl2_edge.tools import choose, evaluate
from owl2_edge.tools.bench.shapes import shape_folder

# Groups of each kind the chooser makes at 7B, one starting at each layer a pass can start at:
# an MLP band (8 x 45 M weights), an attention band (8 x 16.8 M), the visual route's V band
# (8 x 16.8 M in the sidecar), the last band's MLP, the embedding (from layer 0), the output
# (the head alone).
TIMED_GROUPS = ("blk.0-7.ffn_down", "blk.8-15.attn_q", "owl2.mam.blk.16-23.attn_v",
                "blk.24-31.ffn_up", "token_embd", "output")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=2, help="calibration questions timed")
    ap.add_argument("--type", default="Q4_K", help="the lowered groups' type")
    ap.add_argument("--stock-quantize-s", type=float, default=553.0,
                    help="llama.cpp's quantizer on the 7B F16 base (docs/quantize.md: 553 s "
                         "for Q4_K_M on 2 cores)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    folder = shape_folder("7b", "F16", progress=lambda s, d, t: None)
    print(f"7B F16 folder: {folder} ({time.perf_counter() - t0:.0f} s to build or find)",
          flush=True)
    manifest = Manifest.load(folder)
    base, mam = folder / manifest.decoder_file, folder / manifest.mam_file
    pair = recipe.matrices(base, mam)
    by_key = {m.key: m for m in pair}
    groups = {g.name: g for g in choose.groups_of(pair, manifest.decoder.n_layer)}
    items = evaluate.generated_items(choose.DEFAULT_CALIBRATION, choose.CALIBRATION_SEED)
    items = items[:args.questions]

    with Owl2.load(folder, device="cpu", n_threads=args.threads, n_ctx=512) as owl:
        t0 = time.perf_counter()
        probe = choose.Probe(owl, items)
        reference = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory(prefix=".owl2-choose-7b-", dir=folder.parent) as scratch:
        bench = choose._Workbench(base, mam, Path(scratch), None)
        # A pair written whole (what the check does once for the recipe; what every pass did
        # before passes lowered their group in memory).
        t0 = time.perf_counter()
        bench.pair({k: recipe.TENSOR_TYPES[args.type] for k in groups[TIMED_GROUPS[0]].keys})
        write = time.perf_counter() - t0
        print(json.dumps({"write_pair_s": round(write, 1)}), flush=True)
        t0 = time.perf_counter()
        with probe.open(base, mam, [g.first_layer for g in groups.values()]) as source:
            states = time.perf_counter() - t0  # the load, and the pass that keeps the states
            print(json.dumps({"open_and_keep_states_s": round(states, 1)}), flush=True)
            for name in TIMED_GROUPS:
                g = groups[name]
                t0 = time.perf_counter()
                encoded = bench.encoded({k: recipe.TENSOR_TYPES[args.type] for k in g.keys})
                encode = time.perf_counter() - t0
                t0 = time.perf_counter()
                source.override_weights(encoded)
                source.clear_overrides()
                place = time.perf_counter() - t0
                t0 = time.perf_counter()
                kl = probe.kl_lowered(source, encoded, g.first_layer)
                read = time.perf_counter() - t0 - place
                rows.append({"group": name, "first_layer": g.first_layer,
                             "matrices": len(g.keys), "encode_s": round(encode, 1),
                             "place_s": round(place, 2), "measure_s": round(read, 1), "kl": kl})
                print(json.dumps(rows[-1]), flush=True)

    # --estimate scaled's rounding errors: every matrix at every ladder type, timed on one group.
    g = groups[TIMED_GROUPS[0]]
    t0 = time.perf_counter()
    choose.scale_costs([choose.Group(g.name, g.keys, g.pattern, cost={"Q2_K": 1.0},
                                     size={t: 0 for t in choose.LADDER})], base, mam, {})
    per_weight = (time.perf_counter() - t0) / sum(by_key[k].rows * by_key[k].cols for k in g.keys)
    all_weights = sum(m.rows * m.cols for m in pair)

    n_groups = len(groups)
    per_question_ref = reference / len(probe.questions)
    fixed = sum(r["encode_s"] + r["place_s"] for r in rows) / len(rows)  # per pass, besides reading
    # A question's pass from each first layer (the mean of the timed groups starting there).
    by_first: dict[int, list[float]] = {}
    for r in rows:
        by_first.setdefault(r["first_layer"], []).append(r["measure_s"] / len(probe.questions))
    forward_from = {layer: sum(v) / len(v) for layer, v in by_first.items()}
    whole = forward_from[0]
    forward = sum(forward_from[g.first_layer] for g in groups.values()) / len(groups)
    calibration = choose.DEFAULT_CALIBRATION * 3
    check = choose.CHECK_PER_TYPE * 3
    # The load counted with the questions' pass that keeps the states: a bound from above.
    keep_states = states / len(probe.questions)
    print(json.dumps({"reference_s_per_question": round(per_question_ref, 1),
                      "write_pair_s": round(write, 1),
                      "encode_and_place_s_per_pass": round(fixed, 1),
                      "forward_s_per_question_from_layer": {k: round(v, 2) for k, v
                                                            in sorted(forward_from.items())},
                      "forward_s_per_question_mean_over_groups": round(forward, 2),
                      "rounding_errors_s_per_ladder_type_all_weights":
                          round(per_weight * all_weights / len(choose.LADDER), 1),
                      "positions_per_question": probe.positions / len(probe.questions)}))
    for estimate in choose.ESTIMATES:
        passes = n_groups * (len(choose.LADDER) if estimate == "measured" else 2)
        seconds = (per_question_ref * (calibration + check)
                   + keep_states * calibration                # the pass that keeps the states
                   + passes * (fixed + forward * calibration)
                   + write + 3 * whole * check                # the recipe and two stock types
                   + 2 * args.stock_quantize_s)
        if estimate == "scaled":
            seconds += per_weight * all_weights
        print(json.dumps({"estimate": estimate, "groups": n_groups, "passes": passes,
                          "calibration_questions": calibration, "check_questions": check,
                          "estimated_hours": round(seconds / 3600, 1)}))


if __name__ == "__main__":
    main()
