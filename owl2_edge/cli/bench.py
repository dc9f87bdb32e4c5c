"""`owl2 bench`: speed and memory against stock llama.cpp (owl2_edge/tools/bench/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import app, console, err, fail, progress_when_needed
from owl2_edge.cli.options import MODEL
from owl2_edge.errors import Owl2Error

_SHAPE_HELP = ("Measure a model of this shape with random weights instead, built once and cached "
               "($OWL2_BENCH_CACHE or ~/.cache/owl2-edge/bench): 7b (the release's) or 1b. "
               "Needs torch.")


@app.command("bench")
def bench_cmd(
    model: Optional[Path] = MODEL.info,
    shape: Optional[str] = typer.Option(None, "--shape", help=_SHAPE_HELP),
    quant: Optional[str] = typer.Option(None, "--quant", "-q",
                                        help="With --shape: the decoder's type (default Q4_K_M)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (every engine runs there)."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t",
                                          help="CPU threads of every engine (default: physical cores)."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved rounds; the medians are shown."),
    only: Optional[str] = typer.Option(None, "--only",
                                       help="Some of decoder,vision,ask (comma-separated)."),
    as_json: bool = typer.Option(False, "--json", help="The whole result as one JSON object."),
):
    """Speed and memory against stock llama.cpp and the stock pipeline, on the same files."""
    from owl2_edge.tools.bench import report, runner
    try:
        folder, threads, groups = _bench_setting(model, shape, quant, device, threads, rounds, only)
        with runner.sample_picture() as picture:
            bench = runner.plan(folder, threads, device, groups, picture)
            runs = runner.run_rounds(bench, rounds, on_job=lambda r, job, result: err.print(
                f"round {r}/{rounds} · {job.key} · {result['wall_s']:.1f} s", markup=False))
        result = report.summary(bench, runs, rounds, shape)
    except (Owl2Error, ValueError) as e:
        raise fail(str(e))
    if as_json:
        print(json.dumps(result))
        return
    for renderable in report.tables(result):
        console.print(renderable)


def _bench_setting(model, shape, quant, device, threads, rounds, only):
    """Every option checked before anything is built or run; then the model folder (built
    once for --shape), the thread count and the groups to run."""
    from owl2_edge import _decoder, checks
    from owl2_edge.tools.bench import runner, shapes, workers
    from owl2_edge.model_dir import default_model_path
    if model is not None and shape is not None:
        raise Owl2Error("give -m MODEL_DIR or --shape, not both")
    if quant is not None and shape is None:
        raise Owl2Error("--quant goes with --shape (a model folder's decoder type is fixed; "
                        "owl2 quantize makes another)")
    checks.choice("--device", device, workers.DEVICES)
    threads = checks.threads("--threads", threads) or _decoder.default_n_threads()
    checks.integer("--rounds", rounds, 1, 1000)
    groups = runner.parse_groups(only)
    if shape is None:
        return model or default_model_path(), threads, groups
    with progress_when_needed() as report:  # bars only when the shape is built
        folder = shapes.shape_folder(shape, quant or shapes.DEFAULT_QUANT, progress=report)
    return folder, threads, groups
