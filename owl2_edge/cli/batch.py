"""`owl2 batch`: many questions into a resumable JSONL (owl2_edge/batch/)."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import EXIT_INTERRUPTED, app, check_sampling, err, fail
from owl2_edge.cli.options import CACHE, CLIPS, RUNTIME, SAMPLING, load_kwargs, with_options
from owl2_edge.errors import Owl2Error

_BATCH_OUT_HELP = ("JSONL to write (a regular file, not a folder or a device): one row per input "
                   "(index, image, question, answer, token counts, finish_reason, timings; or "
                   "error), written as each finishes. Run the same command again to resume: rows "
                   "already there, error rows included, are skipped (--retry-errors redoes the "
                   "error rows); an input's duplicate rows are dropped.")
# \\[ray]: help text is rich markup, where [ray] would vanish as a tag.
_RAY_HELP = ("Run on Ray Data (pip install 'owl2-edge\\[ray]'), one Owl2 per Ray actor. Every "
             "node must see the model folder and the images at the same paths.")
_RAY_ADDRESS_HELP = ("The Ray cluster to run on (implies --ray): auto, ray://HOST:10001, ... "
                     "Default: $RAY_ADDRESS, else a new local Ray.")


@app.command("batch")
@with_options(RUNTIME, SAMPLING, CACHE, CLIPS)
def batch_cmd(
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="FOLDER|FILE.txt",
        help="A folder's pictures (sorted by name, not recursive), or a list: one path a line, "
             "relative to the list's folder, # comments. With --question."),
    question: Optional[str] = typer.Option(None, "--question",
                                           help="The question asked of every --images picture."),
    questions: Optional[Path] = typer.Option(
        None, "--questions", metavar="FILE.jsonl",
        help='{"image": PATH or null, "question": TEXT} per line ("video": PATH for a clip; '
             "paths relative to the file's folder; other keys ignored; a line that is not valid Unicode gets an error row). "
             "Instead of --images and --question."),
    out: Path = typer.Option(..., "-o", "--out", metavar="OUT.jsonl", help=_BATCH_OUT_HELP),
    parallel: int = typer.Option(4, "--parallel",
                                 help="Answers decoded together; each gets --ctx positions "
                                      "(the cache holds parallel x ctx)."),
    retry_errors: bool = typer.Option(False, "--retry-errors",
                                      help="Answer again the inputs whose row in OUT is an error."),
    # Two options rather than `--ray [ADDRESS]`: typer has no option with an optional value.
    ray: bool = typer.Option(False, "--ray", help=_RAY_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                              help=_RAY_ADDRESS_HELP),
    ray_actors: int = typer.Option(1, "--ray-actors",
                                   help="With --ray: model copies (Ray actors), one Owl2 each."),
    as_json: bool = typer.Option(False, "--json", help="The summary as one JSON object on stdout."),
    *, runtime: dict, sampling: dict, cache: dict, clip: dict,
):
    """Answer many questions into a resumable JSONL: owl2 batch --images pics/ --question
    "What is this?" -o answers.jsonl."""
    from owl2_edge.batch import run
    from owl2_edge.batch.output import Output
    started = time.perf_counter()
    ray = ray or ray_address is not None
    output = None
    try:
        items, load = _batch_setting(images, question, questions, parallel, ray, ray_actors,
                                     runtime, sampling, cache)
        items = _sampled(items, clip)
        with Output.open(out, items, retry_errors) as output:
            todo, refused = run.split_refused(run.pending(items, output))
            with _batch_progress(len(items), len(output.done)) as on_row:
                if ray:
                    from owl2_edge.batch.ray_job import ray_rows
                    rows = ray_rows(todo, load, sampling, parallel, ray_actors, ray_address)
                else:
                    rows = _local_rows(load, todo, parallel, sampling)
                summary = run.write_rows(itertools.chain(refused, rows), output, len(items),
                                         started, on_row)
    except Owl2Error as e:
        raise fail(str(e))
    except KeyboardInterrupt:
        kept = len(output.done) if output is not None else 0
        err.print(f"interrupted: {kept} rows in {out}; run the same command again to go on",
                  markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(summary.line(), markup=False)
    if as_json:
        print(json.dumps(summary.to_dict()), flush=True)


def _batch_setting(images, question, questions, parallel, ray, ray_actors, runtime, sampling,
                   cache):
    """Every option and input checked before anything loads: the items and Owl2.load's
    arguments (the cache holds parallel x --ctx positions)."""
    from owl2_edge import checks
    from owl2_edge.batch.inputs import read_items
    from owl2_edge.decoder import MAX_SEQUENCES
    from owl2_edge.load_options import MAX_CTX
    from owl2_edge.model_dir import Manifest, default_model_path
    check_sampling(sampling)
    checks.integer("--parallel", parallel, 1, MAX_SEQUENCES)
    checks.integer("--ctx", runtime["ctx"], 1, MAX_CTX // parallel)
    checks.integer("--ray-actors", ray_actors, 1, 4096)
    if not ray and ray_actors != 1:
        raise Owl2Error("--ray-actors goes with --ray")
    items = read_items(images, question, questions)
    load = {**load_kwargs(runtime, cache), "n_ctx": parallel * runtime["ctx"]}
    if ray:
        from owl2_edge.batch.ray_job import import_ray
        import_ray()
        Manifest.load(load["path"] or default_model_path())  # here, not in every actor
    return items, load


def _sampled(items: list, clip: dict) -> list:
    """With --frames/--start/--end, each item whose file is a clip asks about it so sampled
    (refused when none is: the options would be ignored)."""
    if all(v is None for v in clip.values()):
        return items
    import dataclasses

    from owl2_edge import clips
    given = {k: v for k, v in clip.items() if v is not None}
    out = [dataclasses.replace(item, image=clips.Clip(item.image, **given))
           if item.image is not None and clips.clip_kind(item.image) is not None else item
           for item in items]
    if not any(isinstance(item.image, clips.Clip) for item in out):
        raise Owl2Error(f"{', '.join('--' + k for k in given)} sample a clip (a video or an "
                        f"animated picture), and no input is one")
    return out


def _local_rows(load: dict, todo, parallel: int, sampling: dict):
    """Rows from one Owl2 in this process, loaded only when there is something to answer."""
    if not todo:
        return
    from owl2_edge.batch.run import local_rows
    from owl2_edge.owl2 import Owl2
    with Owl2.load(**load) as owl:
        yield from local_rows(owl, todo, parallel, **sampling)


@contextlib.contextmanager
def _batch_progress(total: int, done: int):
    """An on_row(row) callback drawing done/total, images/s and the ETA on stderr."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):  # rich's speed: over the last 30 s of updates
            return Text(f"{task.speed:.2f} images/s" if task.speed else "- images/s")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                  TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as bar:
        task = bar.add_task("batch", total=total, completed=done)
        errors = 0

        def on_row(row: dict) -> None:
            nonlocal errors
            errors += "error" in row
            bar.update(task, advance=1, description=f"batch ({errors} errors)" if errors
                       else "batch")
        yield on_row
