"""The `owl2` command: thin typer commands over the Python API.

Every command parses its options, calls the API, and turns an owl2-edge error into one line on
stderr and a non-zero exit code; nothing below this edge prints or exits.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from owl2_edge.cli_options import (MODEL, OUTPUT, RUNTIME, RUNTIME_NO_MODEL, SAMPLING,
                                   load_kwargs, with_options)
from owl2_edge.errors import Owl2Error
from owl2_edge.evaluate import DEFAULT_MAX_TOKENS
from owl2_edge.names import DEFAULT_VISION_VARIANTS, VISION_VARIANT_NOTES
from owl2_edge.serve.limits import Limits as ServeLimits

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


_IMATRIX_HELP = ("Importance matrix from `owl2 imatrix` (the very low-bit types need one; "
                 "see README, Quantize).")
_VISION_HELP = ("Vision file(s) to write (repeatable): "
                + ", ".join(f"{v} ({note})" for v, note in VISION_VARIANT_NOTES.items()) + ".")


def _run_convert(hf_dir: Path, out_dir: Path, quant: str, vision: list[str], force: bool,
                 imatrix: Optional[Path] = None):
    convert = _converter()[0].convert
    importance = _read_imatrix(imatrix)
    with _progress() as bar:
        return convert(hf_dir, out_dir, quant=quant, vision=tuple(vision), force=force,
                       progress=_stage_reporter(bar), importance=importance)


@app.command("convert")
def convert_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face mPLUG-Owl2 checkpoint folder, or a Hub "
                                            "id (MAGAer13/mplug-owl2-llama2-7b) to download."),
    out: Path = typer.Option(..., "-o", "--out", help="Model folder to write."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q",
                              help="Decoder type: F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, ..."),
    vision: list[str] = typer.Option(list(DEFAULT_VISION_VARIANTS), "--vision", help=_VISION_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help=_IMATRIX_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Convert a Hugging Face mPLUG-Owl2 checkpoint into an owl2-edge model folder."""
    try:
        manifest = _run_convert(hf_dir, out, quant, vision, force, imatrix)
    except (Owl2Error, FileExistsError, ValueError) as e:
        raise _fail(str(e))
    size = sum((out / f).stat().st_size for f in manifest.files())
    console.print(f"wrote {out} ({size / 2**20:.1f} MiB, decoder {manifest.quant})")


def _load(runtime: dict):
    from owl2_edge.owl2 import Owl2
    # The first question encodes its images while the decoder's weights are still loading.
    return Owl2.load(**load_kwargs(runtime), wait=False)


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
        err.print(f"load {t['load_s']:.2f} s (+{t['load_wait_s']:.2f} s waited) · first token "
                  f"{t['first_token_s']:.2f} s · vision {t['vision_s']:.2f} s · prefill "
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


# `owl2 serve`'s limits, flag by flag (owl2_edge/serve/limits.py holds the defaults).
_SERVE_FLAGS = {"max_queue": "--max-queue", "max_body_bytes": "--max-body-mb",
                "max_images": "--max-images", "max_tokens": "--max-tokens-limit"}


@app.command("serve")
@with_options(RUNTIME)
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every "
                                                       "interface; think of --api-key then)."),
    port: int = typer.Option(8080, "--port", "-p", help="Port to listen on (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OWL2_API_KEY",
                                          help="Require Authorization: Bearer KEY (also from "
                                               "$OWL2_API_KEY, which keeps it out of ps)."),
    allow_path: list[Path] = typer.Option([], "--allow-path", metavar="DIR",
                                          help="Read file:// images under DIR (repeatable)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Download http(s) images (size and time "
                                                  "limited)."),
    max_queue: int = typer.Option(ServeLimits.max_queue, "--max-queue",
                                  help="Requests that may wait behind the one being answered; "
                                       "more get 429."),
    max_body_mb: float = typer.Option(ServeLimits.max_body_bytes / 2**20, "--max-body-mb",
                                      help="Largest request body in MiB (base64 images included)."),
    max_images: int = typer.Option(ServeLimits.max_images, "--max-images",
                                   help="Most images per request."),
    max_tokens_limit: int = typer.Option(ServeLimits.max_tokens, "--max-tokens-limit",
                                         help="Largest max_tokens a request may ask for."),
    *, runtime: dict,
):
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) and a chat page."""
    try:
        limits = _serve_limits(max_queue=max_queue, max_body_bytes=_mib(max_body_mb),
                               max_images=max_images, max_tokens=max_tokens_limit)
        for folder in allow_path:
            if not folder.is_dir():
                raise Owl2Error(f"--allow-path {folder}: not a folder")
        from owl2_edge.owl2 import Owl2
        from owl2_edge.serve import server
        from owl2_edge.serve.app import create_app
        with _listen(server, host, port) as sock:  # a port in use fails before the model loads
            owl = Owl2.load(**load_kwargs(runtime))
            app = create_app(owl, limits, api_key=api_key, allow_paths=allow_path,
                             allow_remote_images=allow_remote_images)
            console.print(f"owl2 serve: {server.url_of(sock)}/ ({owl.folder.name} on "
                          f"{owl.decoder.device}; one request at a time; Ctrl-C stops)",
                          markup=False, soft_wrap=True)
            try:
                server.serve(app, sock)
            except KeyboardInterrupt:
                # uvicorn stops at the first Ctrl-C, then raises it again for us.
                raise typer.Exit(EXIT_INTERRUPTED)
            finally:
                app.state.server.queue.close()
                owl.close()
    except Owl2Error as e:
        raise _fail(str(e))


def _serve_limits(**values):
    from owl2_edge.errors import ArgumentError
    try:
        return ServeLimits(**values)
    except ArgumentError as e:
        name = str(e).split(" ", 1)[0]
        raise Owl2Error(str(e).replace(name, _SERVE_FLAGS.get(name, name), 1)) from None


def _mib(value: float) -> int:
    from owl2_edge.checks import number
    return int(number("--max-body-mb", value, 0, 2**20, lo_open=True) * 2**20)


def _listen(server, host: str, port: int):
    from owl2_edge.checks import integer
    integer("--port", port, 0, 65535)
    try:
        return server.bind(host, port)
    except OSError as e:
        why = e.strerror or str(e)
        raise Owl2Error(f"cannot listen on {host}:{port}: {why}") from None


_BATCH_OUT_HELP = ("JSONL to write: one row per input (index, image, question, answer, token counts, "
                   "finish_reason, timings; or error), flushed as each finishes. Run the same "
                   "command again to resume: rows already there, error rows included, are "
                   "skipped (--retry-errors redoes the error rows).")
# \\[ray]: help text is rich markup, where [ray] would vanish as a tag.
_RAY_HELP = ("Run on Ray Data (pip install 'owl2-edge\\[ray]'), one Owl2 per Ray actor. Every "
             "node must see the model folder and the images at the same paths.")
_RAY_ADDRESS_HELP = ("The Ray cluster to run on (implies --ray): auto, ray://HOST:10001, ... "
                     "Default: $RAY_ADDRESS, else a new local Ray.")


@app.command("batch")
@with_options(RUNTIME, SAMPLING)
def batch_cmd(
    images: Optional[Path] = typer.Option(
        None, "--images", metavar="FOLDER|FILE.txt",
        help="A folder's pictures (sorted by name, not recursive), or a list: one path a line, "
             "relative to the list's folder, # comments. With --question."),
    question: Optional[str] = typer.Option(None, "--question",
                                           help="The question asked of every --images picture."),
    questions: Optional[Path] = typer.Option(
        None, "--questions", metavar="FILE.jsonl",
        help='{"image": PATH or null, "question": TEXT} per line (paths relative to the file\'s '
             "folder; other keys ignored). Instead of --images and --question."),
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
    *, runtime: dict, sampling: dict,
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
                                     runtime, sampling)
        with Output.open(out, items, retry_errors) as output:
            todo = run.pending(items, output)
            with _batch_progress(len(items), len(output.done)) as on_row:
                if ray:
                    from owl2_edge.batch.ray_job import ray_rows
                    rows = ray_rows(todo, load, sampling, parallel, ray_actors, ray_address)
                else:
                    rows = _local_rows(load, todo, parallel, sampling)
                summary = run.write_rows(rows, output, len(items), started, on_row)
    except Owl2Error as e:
        raise _fail(str(e))
    except KeyboardInterrupt:
        kept = len(output.done) if output is not None else 0
        err.print(f"interrupted: {kept} rows in {out}; run the same command again to go on",
                  markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    err.print(summary.line(), markup=False)
    if as_json:
        print(json.dumps(summary.to_dict()), flush=True)


def _batch_setting(images, question, questions, parallel, ray, ray_actors, runtime, sampling):
    """Every option and input checked before anything loads: the items and Owl2.load's
    arguments (the cache holds parallel x --ctx positions)."""
    from owl2_edge import checks
    from owl2_edge.batch.inputs import read_items
    from owl2_edge.decoder import MAX_CTX, MAX_SEQUENCES
    from owl2_edge.model_dir import Manifest, default_model_path
    _check_sampling(sampling)
    checks.integer("--parallel", parallel, 1, MAX_SEQUENCES)
    checks.integer("--ctx", runtime["ctx"], 1, MAX_CTX // parallel)
    checks.integer("--ray-actors", ray_actors, 1, 4096)
    if not ray and ray_actors != 1:
        raise Owl2Error("--ray-actors goes with --ray")
    items = read_items(images, question, questions)
    load = {**load_kwargs(runtime), "n_ctx": parallel * runtime["ctx"]}
    if ray:
        from owl2_edge.batch.ray_job import import_ray
        import_ray()
        Manifest.load(load["path"] or default_model_path())  # here, not in every actor
    return items, load


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
    try:
        items = _eval_items(data, generated, seed, need_answers=False)
        out = _compare(reference, candidate, items, runtime, max_tokens)
    except Owl2Error as e:
        raise _fail(str(e))
    _print_comparison(out, reference, candidate, as_json)


def _compare(reference: Path, candidate: Path, items, runtime: dict, max_tokens: int) -> dict:
    from owl2_edge.compare import compare
    from owl2_edge.owl2 import Owl2
    kwargs = load_kwargs(runtime)
    with _progress() as bar:
        result = compare(reference, candidate, items,
                         lambda path: Owl2.load(**{**kwargs, "path": path}), max_tokens,
                         _stage_reporter(bar))
    return result.to_dict()


def _print_comparison(out: dict, reference: Path, candidate: Path, as_json: bool) -> None:
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




@app.command("quantize")
@with_options(RUNTIME_NO_MODEL)
def quantize_cmd(
    src: Path = typer.Argument(..., help="Model folder to quantize (F16, BF16 or F32)."),
    out: Path = typer.Option(..., "-o", "--out", help="Model folder to write."),
    quant: str = typer.Option(..., "--quant", "-q", help="Decoder type: Q4_K_M, Q8_0, IQ4_XS, ..."),
    vision: Optional[list[str]] = typer.Option(
        None, "--vision", help=_VISION_HELP + " Default: the source folder's."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help=_IMATRIX_HELP),
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="Quantize a folder that is already quantized."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    report: bool = typer.Option(False, "--report",
                                help="Then compare the result with SRC (owl2 compare's table)."),
    report_n: int = typer.Option(20, "--report-n", help="Questions per type for --report."),
    as_json: bool = typer.Option(False, "--json", help="--report's measures as one JSON object."),
    *, runtime: dict,
):
    """Quantize a model folder to another type: no torch and no checkpoint needed."""
    from owl2_edge import evaluate
    from owl2_edge.quantize import quantize_folder
    try:
        importance = _read_imatrix(imatrix)
        with _progress() as bar:
            manifest = quantize_folder(src, out, quant, vision, importance, allow_requantize,
                                       force, progress=_stage_reporter(bar))
        size = sum((out / f).stat().st_size for f in manifest.files())
        err.print(f"wrote {out} ({size / 2**20:.1f} MiB, decoder {manifest.quant}, vision "
                  f"{', '.join(manifest.vision_files)})")
        if report:
            items = evaluate.generated_items(report_n, 0)
            _print_comparison(_compare(src, out, items, runtime, DEFAULT_MAX_TOKENS), src, out,
                              as_json)
    except (Owl2Error, FileExistsError, ValueError) as e:
        raise _fail(str(e))


def _read_imatrix(path: Optional[Path]):
    if path is None:
        return None
    from owl2_edge.imatrix import ImportanceMatrix
    return ImportanceMatrix.read(path)


@contextlib.contextmanager
def _progress_when_needed():
    """A progress(stage, done, total) callback whose bars appear at its first call: nothing is
    printed (not even an empty line) when no work was reported."""
    with contextlib.ExitStack() as stack:
        report = []

        def progress(stage: str, done: int, total: int):
            if not report:
                report.append(_stage_reporter(stack.enter_context(_progress())))
            report[0](stage, done, total)
        yield progress


def _stage_reporter(bar):
    """progress(stage, done, total) callbacks as one bar per stage."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int):
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)
    return report


@app.command("imatrix")
@with_options(RUNTIME)
def imatrix_cmd(
    out: Path = typer.Option(..., "-o", "--out", help="Importance matrix file to write (.gguf)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="JSONL calibration prompts: image (optional) and prompt (or "
                             "question), answer optional, per line. Default: built-in pictures."),
    n_prompts: int = typer.Option(64, "--prompts", help="How many built-in prompts."),
    seed: int = typer.Option(0, "--seed", help="Which built-in prompts."),
    *, runtime: dict,
):
    """Collect an importance matrix through the MAM decoder, images included (for --imatrix)."""
    from owl2_edge import evaluate, imatrix
    try:
        if data is not None:
            prompts = imatrix.prompts_from_items(evaluate.read_items(data, need_answers=False))
            dataset = str(data)
        else:
            prompts = imatrix.calibration_prompts(n_prompts, seed)
            dataset = f"owl2-edge built-in scenes (n={n_prompts}, seed={seed})"
        with _load(runtime) as owl, _progress() as bar:
            task = bar.add_task("imatrix", total=len(prompts))
            result = imatrix.collect(owl, prompts, dataset,
                                     on_progress=lambda done, total: bar.update(task, completed=done))
        result.write(out)
    except Owl2Error as e:
        raise _fail(str(e))
    visual = sum(e.count for e in result.mam.values()) // max(len(result.mam), 1)
    err.print(f"wrote {out}: {len(result.base)} base and {len(result.mam)} visual-route matrices "
              f"from {result.chunk_count} prompts ({visual} image positions per visual matrix)")


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
    from owl2_edge.bench import report, runner
    try:
        folder, threads, groups = _bench_setting(model, shape, quant, device, threads, rounds, only)
        with runner.sample_picture() as picture:
            bench = runner.plan(folder, threads, device, groups, picture)
            runs = runner.run_rounds(bench, rounds, on_job=lambda r, job, result: err.print(
                f"round {r}/{rounds} · {job.key} · {result['wall_s']:.1f} s", markup=False))
        result = report.summary(bench, runs, rounds, shape)
    except (Owl2Error, ValueError) as e:
        raise _fail(str(e))
    if as_json:
        print(json.dumps(result))
        return
    for renderable in report.tables(result):
        console.print(renderable)


def _bench_setting(model, shape, quant, device, threads, rounds, only):
    """Every option checked before anything is built or run; then the model folder (built
    once for --shape), the thread count and the groups to run."""
    from owl2_edge import _decoder, checks
    from owl2_edge.bench import runner, shapes, workers
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
    with _progress_when_needed() as report:  # bars only when the shape is built
        folder = shapes.shape_folder(shape, quant or shapes.DEFAULT_QUANT, progress=report)
    return folder, threads, groups


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
