"""`owl2 eval` and `owl2 compare`: how right a model folder is, and how far from another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import app, console, fail, load_owl, progress, stage_reporter
from owl2_edge.cli.options import RUNTIME, RUNTIME_NO_MODEL, load_kwargs, with_options
from owl2_edge.errors import Owl2Error
from owl2_edge.tools.evaluate import DEFAULT_MAX_TOKENS

DEFAULT_GENERATED = 200


def _eval_items(data: Optional[Path], generated: Optional[int], seed: int, need_answers=True,
                suite: Optional[str] = None, frames: Optional[int] = None, shuffled: bool = False):
    from owl2_edge import checks, scenes
    from owl2_edge.tools import evaluate
    if data is not None and generated is not None:
        raise Owl2Error("give --data or --generated, not both")
    if data is not None:
        given = [name for name, value in (("--suite", suite), ("--frames", frames),
                                          ("--shuffle-frames", shuffled or None))
                 if value is not None]
        if given:
            raise Owl2Error(f"{given[0]} is for --generated questions, not --data")
        return evaluate.read_items(data, need_answers=need_answers)
    # 0 is refused under the option's name, not taken for "the default" (generated_items checks
    # the upper bound).
    n = DEFAULT_GENERATED if generated is None else checks.integer("--generated", generated, 1)
    suite = suite or "pictures"
    if suite != "clips" and (frames is not None or shuffled):
        raise Owl2Error(f"{'--frames' if frames is not None else '--shuffle-frames'} is for "
                        "--suite clips")
    if suite not in evaluate.SUITES:
        raise Owl2Error(f"--suite {suite!r}: choose one of {', '.join(evaluate.SUITES)}")
    if frames is not None:
        checks.integer("--frames", frames, scenes.MIN_FRAMES, scenes.MAX_FRAMES)
    return evaluate.generated_items(n, seed, suite, frames or evaluate.DEFAULT_FRAMES, shuffled)


_DATA_HELP = ("JSONL questions: image, question, answer[, type] per line (upstream's eval keys); "
              "a regular file of UTF-8 text.")
_GENERATED_HELP = ("N held-out questions per type about generated pictures of shapes, "
                   f"N >= 1 (the default, with N = {DEFAULT_GENERATED}).")


@app.command("eval")
@with_options(RUNTIME)
def eval_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help=_DATA_HELP),
    generated: Optional[int] = typer.Option(None, "--generated", help=_GENERATED_HELP),
    seed: int = typer.Option(0, "--seed", help="Which generated questions."),
    suite: Optional[str] = typer.Option(
        None, "--suite", help="Which generated questions: pictures (the default: colour, count, "
        "shape at a place), requests (the picture as JSON, free and under its schema; the "
        "report_shape tool: calls and plain replies), clips (motion, a shape appearing or "
        "disappearing, frames counted)."),
    frames: Optional[int] = typer.Option(
        None, "--frames", help="Frames per clip (--suite clips; 2-8, default 4)."),
    shuffle_frames: bool = typer.Option(
        False, "--shuffle-frames", help="Each clip's frames in another order, the answers "
        "unchanged: the control that shows a model reads the order (--suite clips)."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", "-n", help=f"Most tokens per answer (default {DEFAULT_MAX_TOKENS}; "
        "96 for a JSON answer or a tool call)."),
    as_json: bool = typer.Option(False, "--json", help="The scores as one JSON object."),
    *, runtime: dict,
):
    """Exact-match accuracy per question type (greedy answers)."""
    from owl2_edge.tools.evaluate import evaluate
    try:
        items = _eval_items(data, generated, seed, suite=suite, frames=frames,
                            shuffled=shuffle_frames)
        with load_owl(runtime) as owl, progress() as bar:
            task = bar.add_task("eval", total=len(items))
            report = evaluate(owl, items, max_tokens,
                              on_progress=lambda done, total: bar.update(task, completed=done))
            folder = str(owl.folder)
    except Owl2Error as e:
        raise fail(str(e))
    if as_json:
        print(json.dumps({"model": folder, **report.to_dict()}))
        return
    from rich.table import Table
    table = Table("type", "correct", "questions", "accuracy", title=f"accuracy of {folder}")
    for kind in report.total:
        table.add_row(kind, str(report.correct[kind]), str(report.total[kind]),
                      f"{report.accuracy(kind):.3f}")
    table.add_row("[bold]all[/]", str(sum(report.correct.values())),
                  str(sum(report.total.values())), f"[bold]{report.accuracy():.3f}[/]")
    console.print(table)


@app.command("compare")
@with_options(RUNTIME_NO_MODEL)
def compare_cmd(
    reference: Path = typer.Argument(..., help="Reference model folder (e.g. F32 or F16)."),
    candidate: Path = typer.Argument(..., help="Model folder to measure (e.g. Q4_K_M)."),
    data: Optional[Path] = typer.Option(None, "--data", help=_DATA_HELP + " answer optional."),
    generated: Optional[int] = typer.Option(None, "--generated", help=_GENERATED_HELP),
    seed: int = typer.Option(0, "--seed", help="Which generated questions."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n",
                                   help="Most tokens per answer."),
    as_json: bool = typer.Option(False, "--json", help="The measures as one JSON object."),
    *, runtime: dict,
):
    """How far CANDIDATE is from REFERENCE: KL, top-1 agreement, same answers, accuracy."""
    try:
        items = _eval_items(data, generated, seed, need_answers=False)
        out = compare_folders(reference, candidate, items, runtime, max_tokens)
    except Owl2Error as e:
        raise fail(str(e))
    print_comparison(out, reference, candidate, as_json)


def compare_folders(reference: Path, candidate: Path, items, runtime: dict, max_tokens: int) -> dict:
    from owl2_edge.tools.compare import compare
    from owl2_edge.owl2 import Owl2
    kwargs = load_kwargs(runtime)
    with progress() as bar:
        result = compare(reference, candidate, items,
                         lambda path: Owl2.load(**{**kwargs, "path": path}), max_tokens,
                         stage_reporter(bar))
    return result.to_dict()


def print_comparison(out: dict, reference: Path, candidate: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"reference": str(reference), "candidate": str(candidate), **out}))
        return
    from rich.table import Table
    table = Table("measure", "value", title=f"{candidate} against {reference}")
    rows = [("KL mean (nats)", f"{out['kl_mean']:.3g}"), ("KL p99", f"{out['kl_p99']:.3g}"),
            ("top-1 agreement", f"{out['top1_agreement']:.4f}"),
            ("same greedy answer", f"{out['same_answer']:.4f}"),
            ("perplexity ratio", f"{out['ppl_ratio']:.4f}")]
    if out["image_cosine"] is not None:
        rows.append(("image embedding cosine", f"{out['image_cosine']:.6f}"))
    if "reference" in out:
        rows.append(("accuracy, reference", f"{out['reference']['accuracy']:.3f}"))
        rows.append(("accuracy, candidate", f"{out['candidate']['accuracy']:.3f}"))
        for kind, cand in out["candidate"]["types"].items():
            ref = out["reference"]["types"][kind]
            rows.append((f"  {kind}", f"{ref['accuracy']:.3f} -> {cand['accuracy']:.3f}"))
    for row in rows:
        table.add_row(*row)
    table.caption = f"{out['questions']} questions, {out['positions']} answer positions"
    console.print(table)
