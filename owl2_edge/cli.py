"""The `owl2` command: thin typer commands over the Python API.

Every command parses its options, calls the API, and turns an owl2-edge error into one line on
stderr and a non-zero exit code; nothing below this edge prints or exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from owl2_edge.cli_options import (MODEL, OUTPUT, RUNTIME, RUNTIME_NO_MODEL, SAMPLING,
                                   load_kwargs, with_options)
from owl2_edge.errors import Owl2Error
from owl2_edge.evaluate import DEFAULT_MAX_TOKENS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run mPLUG-Owl2 on your own machine.")
# soft_wrap: a message is one line whatever the terminal width (scripts read stderr by line).
err = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    # One line, whatever the terminal width; the message is text, never rich markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err, transient=False)


def _converter():
    """The converter's entry points; it needs torch & co., which the runtime does not."""
    from owl2_edge.convert import missing_package
    missing = missing_package()
    if missing:
        raise Owl2Error(f"converting needs the converter's packages ({missing} is missing): "
                        f"pip install 'owl2-edge[convert]'")
    from owl2_edge.convert import converter, tiny
    return converter, tiny


def _run_convert(hf_dir: Path, out_dir: Path, quant: str, vision: list[str], force: bool):
    convert = _converter()[0].convert
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


def _load(runtime: dict):
    from owl2_edge.owl2 import Owl2
    return Owl2.load(**load_kwargs(runtime))


def _check_sampling(sampling: dict) -> None:
    """Refuse bad sampling options before loading anything."""
    from owl2_edge.sampling import SamplingParams
    SamplingParams.of(sampling)


def _report(owl, output: dict, text: str) -> None:
    """After an answer: its JSON object (--json) and its timings (--verbose)."""
    stats = owl.stats
    if output["as_json"]:
        print(json.dumps({
            "text": text, "token_ids": stats.tokens, "tokens": stats.generated_tokens,
            "prompt_tokens": stats.prompt_positions, "finish_reason": stats.finish_reason,
            "timings": stats.rates(owl.load_seconds)}, ensure_ascii=False), flush=True)
    if stats.finish_reason == "context":
        err.print("(stopped: the context is full; use --ctx to allow more)")
    if output["verbose"]:
        t = stats.rates(owl.load_seconds)
        err.print(f"load {t['load_s']:.2f} s · vision {t['vision_s']:.2f} s · prefill "
                  f"{t['prefill_s']:.2f} s ({t['prefill_tok_per_s']:.1f} tok/s, "
                  f"{stats.evaluated_positions} positions) · decode {t['decode_s']:.2f} s "
                  f"({t['decode_tok_per_s']:.1f} tok/s, {stats.generated_tokens} tokens) · "
                  f"{owl.decoder.device}, vision on {owl.vision.provider}")


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@app.command("ask")
@with_options(RUNTIME, SAMPLING, OUTPUT)
def ask_cmd(
    args: list[str] = typer.Argument(..., metavar="IMAGE... QUESTION",
                                     help="Zero or more images, then the question."),
    raw: bool = typer.Option(False, "--raw", help="QUESTION is the whole prompt (no template); "
                                                  "<|image|> marks each image's place."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end."),
    *, runtime: dict, sampling: dict, output: dict,
):
    """Ask a question about images: owl2 ask photo.jpg "What is written on the sign?"."""
    images, question = args[:-1], args[-1]
    streaming = not (no_stream or output["as_json"])
    pieces: list[str] = []
    try:
        _check_sampling(sampling)
        owl = _load(runtime)
        for piece in owl.stream(images, question, raw=raw, **sampling):
            pieces.append(piece)
            if streaming:
                _write(piece)
    except Owl2Error as e:
        if streaming and pieces:
            sys.stdout.write("\n")
        raise _fail(str(e))
    text = "".join(pieces).strip()
    if not output["as_json"]:
        print(text if no_stream else "", flush=True)  # before --verbose's line on stderr
    _report(owl, output, text)


@app.command("chat")
@with_options(RUNTIME, SAMPLING, OUTPUT)
def chat_cmd(
    image: Optional[Path] = typer.Argument(None, help="An image to talk about (more with /image)."),
    *, runtime: dict, sampling: dict, output: dict,
):
    """Talk about images: /image PATH adds one, /clear starts over, /exit (or Ctrl-D) leaves."""
    try:
        _check_sampling(sampling)
        owl = _load(runtime)
        chat = owl.chat([image] if image else [])
    except Owl2Error as e:
        raise _fail(str(e))
    while True:
        try:
            # With --json, stdout is JSON lines only: no prompt between them.
            line = input("" if output["as_json"] else ">>> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            chat.clear()
            continue
        if line.startswith("/image"):
            try:
                chat.add_image(line[len("/image"):].strip())
            except Owl2Error as e:
                err.print(f"error: {e}", markup=False)
            continue
        pieces: list[str] = []
        try:
            for piece in chat.send(line, **sampling):
                pieces.append(piece)
                if not output["as_json"]:
                    _write(piece)
            if not output["as_json"]:
                print()
        except KeyboardInterrupt:
            # Ctrl-C during an answer stops that answer (kept as far as it got); at the prompt
            # it leaves the chat.
            print()
            continue
        except Owl2Error as e:
            err.print(f"error: {e}", markup=False)
            continue
        _report(owl, output, "".join(pieces).strip())


@app.command("info")
def info_cmd(
    folder: Optional[Path] = typer.Argument(None, metavar="MODEL",
                                            help="Model folder (default: as ask's -m)."),
    model: Optional[Path] = MODEL.info,
):
    """Show what is in a model folder: files, sizes, types, dimensions."""
    from owl2_edge.info import describe
    from owl2_edge.model_dir import default_model_path
    if folder is not None and model is not None and folder != model:
        raise _fail(f"two model folders given ({folder} and -m {model}); give one")
    try:
        table = describe(folder or model or default_model_path())
    except Owl2Error as e:
        raise _fail(str(e))
    console.print(table)


def _eval_items(data: Optional[Path], generated: Optional[int], seed: int, need_answers=True):
    from owl2_edge import evaluate
    if data is not None and generated is not None:
        raise Owl2Error("give --data or --generated, not both")
    if data is not None:
        return evaluate.read_items(data, need_answers=need_answers)
    return evaluate.generated_items(generated or 200, seed)


_DATA_HELP = "JSONL questions: image, question, answer[, type] per line (upstream's eval keys)."
_GENERATED_HELP = ("N held-out questions per type about generated pictures of shapes "
                   "(the default, with N = 200).")


@app.command("eval")
@with_options(RUNTIME)
def eval_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help=_DATA_HELP),
    generated: Optional[int] = typer.Option(None, "--generated", help=_GENERATED_HELP),
    seed: int = typer.Option(0, "--seed", help="Which generated questions."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n",
                                   help="Most tokens per answer."),
    as_json: bool = typer.Option(False, "--json", help="The scores as one JSON object."),
    *, runtime: dict,
):
    """Exact-match accuracy per question type (greedy answers)."""
    from owl2_edge.evaluate import evaluate
    try:
        items = _eval_items(data, generated, seed)
        with _load(runtime) as owl, _progress() as bar:
            task = bar.add_task("eval", total=len(items))
            report = evaluate(owl, items, max_tokens,
                              on_progress=lambda done, total: bar.update(task, completed=done))
            folder = str(owl.folder)
    except Owl2Error as e:
        raise _fail(str(e))
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
    from owl2_edge.compare import compare
    from owl2_edge.owl2 import Owl2
    try:
        items = _eval_items(data, generated, seed, need_answers=False)
        kwargs = load_kwargs(runtime)
        with _progress() as bar:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int):
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            result = compare(reference, candidate, items,
                             lambda path: Owl2.load(**{**kwargs, "path": path}), max_tokens, report)
    except Owl2Error as e:
        raise _fail(str(e))
    out = result.to_dict()
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


@app.command("demo")
def demo_cmd(
    rebuild: bool = typer.Option(False, "--rebuild", help="Convert the demo model again."),
    question: Optional[str] = typer.Option(None, "--question", "-q",
                                           help="Ask this about the first sample picture instead."),
):
    """Build the demo model once (a tiny mPLUG-Owl2 trained on pictures of shapes; offline) and
    ask it about the sample pictures."""
    from owl2_edge.demo_image import SAMPLES, sample_image, sample_questions
    from owl2_edge.info import describe
    from owl2_edge.model_dir import demo_folder
    from owl2_edge.owl2 import Owl2
    folder = demo_folder()
    try:
        model = ensure_demo_model(folder, rebuild)
        console.print(describe(model))
        owl = Owl2.load(model)
        for i in range(1 if question else len(SAMPLES)):
            image = sample_image(i)  # drawn once, saved and asked about
            picture = folder / f"sample-{i + 1}.png"
            image.save(picture)
            console.print(f"[bold]picture:[/] {escape(str(picture))}")
            asked = [(question, None)] if question else sample_questions(i)
            for q, expected in asked:
                console.print(f"[bold]USER:[/] {escape(q)}")
                console.print("[bold]ASSISTANT:[/] ", end="")
                pieces = []
                for piece in owl.stream(image, q, max_tokens=32, temperature=0):
                    pieces.append(piece)
                    _write(piece)
                answer = "".join(pieces).strip()
                mark = "" if expected is None else (
                    "   [green](right)[/]" if answer == expected else f"   [red](expected {expected})[/]")
                console.print(mark)
    except Owl2Error as e:
        raise _fail(str(e))
    t = owl.stats.rates(owl.load_seconds)
    err.print(f"load {t['load_s']:.2f} s · vision {t['vision_s']:.3f} s · prefill "
              f"{t['prefill_tok_per_s']:.0f} tok/s · decode {t['decode_tok_per_s']:.0f} tok/s "
              f"({owl.decoder.device})")


# The demo model's decoder type: its answers at Q8_0 are those of F32 (README, quantization).
DEMO_QUANT = "Q8_0"


def ensure_demo_model(folder: Path, rebuild: bool = False) -> Path:
    """The demo model folder, converted from the committed checkpoint when it is missing, was
    converted from another version of the checkpoint, or `rebuild`."""
    from owl2_edge.names import MANIFEST_FILE
    _converter()
    from owl2_edge.convert import DEMO_CHECKPOINT as checkpoint
    stamp = folder / "checkpoint.sha256"
    digest = _folder_digest(checkpoint)
    model = folder / "model"
    if rebuild or not (model / MANIFEST_FILE).is_file() or not stamp.is_file() \
            or stamp.read_text().strip() != digest:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        err.print(f"building the demo model in {folder} ...")
        _run_convert(checkpoint, model, DEMO_QUANT, ["fp32"], force=True)
        stamp.write_text(digest + "\n")
    return model


def _folder_digest(folder: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def main():
    # typer turns Ctrl-C inside a command into exit code 130 without a traceback; this catches
    # one that lands before a command runs (while Python imports).
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
