"""The `owl2` command: thin typer commands over the Python API.

Every command parses its options, calls the API, and turns an owl2-edge error into one line on
stderr and a non-zero exit code; nothing below this edge prints or exits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from owl2_edge.errors import Owl2Error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run mPLUG-Owl2 on your own machine.")
err = Console(stderr=True, highlight=False)
console = Console(highlight=False)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def demo_dir() -> Path:
    """Where `owl2 demo` keeps its generated model (per user, survives between runs)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "owl2-edge" / "demo"


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    # One line, whatever the terminal width; the message is text, never rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False)


def _run_convert(hf_dir: Path, out_dir: Path, quant: str, vision: list[str], force: bool):
    from owl2_edge.convert.pipeline import convert
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return convert(hf_dir, out_dir, quant=quant, vision=tuple(vision), force=force,
                       progress=report)


@app.command("convert")
def convert_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face mPLUG-Owl2 checkpoint folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Model folder to write."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q",
                              help="Decoder type: F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, ..."),
    vision: list[str] = typer.Option(["fp32"], "--vision",
                                     help="Vision ONNX variant(s) to write: fp32, fp16 (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Convert a Hugging Face mPLUG-Owl2 checkpoint into an owl2-edge model folder."""
    try:
        manifest = _run_convert(hf_dir, out, quant, vision, force)
    except (Owl2Error, FileExistsError, ValueError) as e:
        raise _fail(str(e))
    size = sum((out / f).stat().st_size for f in manifest.files())
    console.print(f"wrote {out} ({size / 2**20:.1f} MiB, decoder {manifest.quant})")


@app.command("info")
def info_cmd(model: Path = typer.Argument(..., help="owl2-edge model folder.")):
    """Show what is in a model folder: files, sizes, types, dimensions."""
    from owl2_edge.info import describe
    try:
        table = describe(model)
    except Owl2Error as e:
        raise _fail(str(e))
    console.print(table)


@app.command("demo")
def demo_cmd(
    rebuild: bool = typer.Option(False, "--rebuild", help="Generate the demo model again."),
):
    """Build the small demo model (random weights, offline) once, and show it."""
    from owl2_edge.info import describe
    folder = demo_dir()
    try:
        if rebuild or not (folder / "model").is_dir():
            build_demo_model(folder)
        console.print(describe(folder / "model"))
    except Owl2Error as e:
        raise _fail(str(e))
    console.print("[yellow]The demo model has random weights: its answers are noise. "
              "Convert the real release with `owl2 convert` (see README).[/]")


def build_demo_model(folder: Path) -> Path:
    from owl2_edge.convert.tiny import make_tiny_checkpoint
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    err.print(f"building the demo model in {folder} ...")
    make_tiny_checkpoint(folder / "hf", seed=0)
    _run_convert(folder / "hf", folder / "model", "Q8_0", ["fp32"], force=True)
    return folder / "model"


def main():
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
