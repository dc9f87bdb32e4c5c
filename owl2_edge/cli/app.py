"""The `owl2` command's shared edge: the typer app, the consoles, and the one place where an
owl2-edge error becomes one line on stderr and a non-zero exit code (nothing below the CLI prints
or exits). The commands live beside this file, one module per family, and register on `app`.
"""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from owl2_edge.cli.options import load_kwargs

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run mPLUG-Owl2 on your own machine.")
# soft_wrap: a message is one line whatever the terminal width (scripts read stderr by line).
err = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    # One line, whatever the terminal width; the message is text, never rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def progress():
    from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    return Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TextColumn("·"), TimeRemainingColumn(), console=err,
                    transient=False)


def load_owl(runtime: dict, cache: dict | None = None):
    from owl2_edge.owl2 import Owl2
    # The first question encodes its images while the decoder's weights are still loading.
    return Owl2.load(**load_kwargs(runtime, cache), wait=False)


# A schema or grammar file: a megabyte is far beyond any real one.
CONSTRAINT_FILE_BYTES = 2**20


def check_sampling(sampling: dict) -> None:
    """Refuse bad sampling options before loading anything. --json-schema and --grammar are
    read here: the dict then holds the schema (parsed) and the grammar's text, as the API takes
    them."""
    from owl2_edge.sampling import SamplingParams
    if sampling.get("json_schema") is not None:
        sampling["json_schema"] = _json_schema_option(sampling["json_schema"])
    if sampling.get("grammar") is not None:
        sampling["grammar"] = _text_file("--grammar", sampling["grammar"])
    SamplingParams.of(sampling)


def _text_file(option: str, path) -> str:
    from owl2_edge.errors import ArgumentError
    from owl2_edge.textfiles import read_bytes
    data, path = read_bytes(option, path, CONSTRAINT_FILE_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArgumentError(f"{option} {path}: not UTF-8 text") from None


def _json_schema_option(value: str):
    """--json-schema: the JSON given on the command line (it starts with "{"), or a file's."""
    from owl2_edge.textfiles import json_value
    if value.lstrip().startswith("{"):
        return json_value(value, "--json-schema", max_depth=64)
    return json_value(_text_file("--json-schema", value), f"--json-schema {value}", max_depth=64)


def write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@contextlib.contextmanager
def progress_when_needed():
    """A progress(stage, done, total) callback whose bars appear at its first call: nothing is
    printed (not even an empty line) when no work was reported."""
    with contextlib.ExitStack() as stack:
        report = []

        def on_stage(stage: str, done: int, total: int):
            if not report:
                report.append(stage_reporter(stack.enter_context(progress())))
            report[0](stage, done, total)
        yield on_stage


def stage_reporter(bar):
    """progress(stage, done, total) callbacks as one bar per stage."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int):
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)
    return report

