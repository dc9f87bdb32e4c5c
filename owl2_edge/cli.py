"""The `owl2` command: thin typer commands over the Python API.

Every command parses its options, calls the API, and turns an owl2-edge error into one line on
stderr and a non-zero exit code; nothing below this edge prints or exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from owl2_edge.errors import Owl2Error

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
    try:
        import onnx  # noqa: F401
        import sentencepiece  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise Owl2Error(f"converting needs the converter's packages ({e.name} is missing): "
                        f"pip install 'owl2-edge[convert]'") from None
    from owl2_edge.convert import pipeline, tiny
    return pipeline, tiny


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


def _load(model: Optional[Path], device: str, n_ctx: int, threads: Optional[int], kv_type: str,
          flash_attn: bool, aspect: str, no_exif: bool, no_repack: bool = False):
    from owl2_edge.pipeline import Owl2
    return Owl2.load(model, device=device, n_ctx=n_ctx, n_threads=threads, kv_type=kv_type,
                     flash_attn=flash_attn, repack=not no_repack, aspect=aspect,
                     exif_transpose=not no_exif)


MODEL_OPT = typer.Option(None, "-m", "--model", help="Model folder (default: $OWL2_MODEL, then the demo model).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto, cpu or cuda.")
CTX_OPT = typer.Option(2048, "--ctx", help="Context positions (each image takes 65).")
THREADS_OPT = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores).")
KV_OPT = typer.Option("f16", "--kv-type", help="KV cache type: f16, f32, q8_0.")
FA_OPT = typer.Option(False, "--flash-attn", help="Use ggml's fused attention.")
ASPECT_OPT = typer.Option("pad", "--aspect", help="Non-square images: pad (upstream CLI), resize, crop.")
NO_EXIF_OPT = typer.Option(False, "--no-exif", help="Ignore EXIF orientation (upstream's pixels).")
NO_REPACK_OPT = typer.Option(False, "--no-repack", help="CPU: use the weights in place from the mapped "
                                                        "files (instant load; slower matmuls).")


def _sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, ignore_eos) -> dict:
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, ignore_eos=ignore_eos)


@app.command("ask")
def ask_cmd(
    args: list[str] = typer.Argument(..., metavar="IMAGE... QUESTION",
                                     help="Zero or more images, then the question."),
    model: Optional[Path] = MODEL_OPT, device: str = DEVICE_OPT, ctx: int = CTX_OPT,
    threads: Optional[int] = THREADS_OPT, kv_type: str = KV_OPT, flash_attn: bool = FA_OPT,
    aspect: str = ASPECT_OPT, no_exif: bool = NO_EXIF_OPT, no_repack: bool = NO_REPACK_OPT,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.2, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(50, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Never stop at end-of-text."),
    raw: bool = typer.Option(False, "--raw", help="QUESTION is the whole prompt (no template); "
                                                  "<|image|> marks each image's place."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Timings and tokens/s on stderr."),
):
    """Ask a question about images: owl2 ask photo.jpg "What is written on the sign?"."""
    import json
    images, question = args[:-1], args[-1]
    try:
        sampling = _sampling(max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                             ignore_eos)
        from owl2_edge.sampling import SamplingParams
        SamplingParams(**sampling)  # refuse bad options before loading anything
        owl = _load(model, device, ctx, threads, kv_type, flash_attn, aspect, no_exif, no_repack)
        pieces = []
        for piece in owl.stream(images, question, raw=raw, **sampling):
            pieces.append(piece)
            if not (no_stream or as_json):
                sys.stdout.write(piece)
                sys.stdout.flush()
        text = "".join(pieces).strip()
    except (Owl2Error, ValueError) as e:
        if not (no_stream or as_json) and 'pieces' in locals() and pieces:
            sys.stdout.write("\n")
        raise _fail(str(e))
    stats = owl.stats
    if as_json:
        print(json.dumps({
            "text": text, "tokens": stats.generated_tokens, "prompt_tokens": stats.prompt_positions,
            "finish_reason": stats.finish_reason, "timings": _timings(owl)}, ensure_ascii=False))
    elif no_stream:
        print(text)
    else:
        print()
    if stats.finish_reason == "context":
        err.print("(stopped: the context is full; use --ctx to allow more)")
    if verbose:
        t = _timings(owl)
        err.print(f"load {t['load_s']:.2f} s · vision {t['vision_s']:.2f} s · prefill "
                  f"{t['prefill_s']:.2f} s ({t['prefill_tok_per_s']:.1f} tok/s, "
                  f"{stats.evaluated_positions} positions) · decode {t['decode_s']:.2f} s "
                  f"({t['decode_tok_per_s']:.1f} tok/s, {stats.generated_tokens} tokens) · "
                  f"{owl.decoder.device}, vision on {owl.vision.provider}")


def _timings(owl) -> dict:
    s, t = owl.stats, owl.stats.timings
    prefill, decode = t.get("prefill", 0.0), t.get("decode", 0.0)
    return {"load_s": round(getattr(owl, "load_seconds", 0.0), 3), "vision_s": round(t.get("vision", 0.0), 3),
            "prefill_s": round(prefill, 3), "decode_s": round(decode, 3),
            "prefill_tok_per_s": round(s.evaluated_positions / prefill, 2) if prefill else 0.0,
            "decode_tok_per_s": round(s.generated_tokens / decode, 2) if decode else 0.0}


@app.command("chat")
def chat_cmd(
    image: Optional[Path] = typer.Argument(None, help="An image to talk about (more with /image)."),
    model: Optional[Path] = MODEL_OPT, device: str = DEVICE_OPT, ctx: int = CTX_OPT,
    threads: Optional[int] = THREADS_OPT, kv_type: str = KV_OPT, flash_attn: bool = FA_OPT,
    aspect: str = ASPECT_OPT, no_exif: bool = NO_EXIF_OPT, no_repack: bool = NO_REPACK_OPT,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.2, "--temperature"),
    top_k: int = typer.Option(50, "--top-k"), top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
):
    """Talk about images: /image PATH adds one, /clear starts over, /exit (or Ctrl-D) leaves."""
    try:
        owl = _load(model, device, ctx, threads, kv_type, flash_attn, aspect, no_exif, no_repack)
        chat = owl.chat([image] if image else [])
    except Owl2Error as e:
        raise _fail(str(e))
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    while True:
        try:
            line = input(">>> ").strip()
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
        try:
            for piece in chat.send(line, **sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:
            # Ctrl-C during an answer stops that answer (kept as far as it got); at the prompt
            # it leaves the chat.
            print()
        except (Owl2Error, ValueError) as e:
            err.print(f"error: {e}", markup=False)


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
    question: str = typer.Option("What is written on the sign?", "--question", "-q"),
):
    """Build the small demo model once (random weights, offline) and ask it about a sample image."""
    from owl2_edge.info import describe
    from owl2_edge.pipeline import Owl2
    from owl2_edge.sample import sample_image
    from owl2_edge.model_dir import demo_folder
    folder = demo_folder()
    try:
        if rebuild or not (folder / "model" / "owl2.json").is_file():
            build_demo_model(folder)
        console.print(describe(folder / "model"))
        owl = Owl2.load(folder / "model")
        console.print(f"[bold]USER:[/] <sample image> {escape(question)}")
        console.print("[bold]ASSISTANT:[/] ", end="")
        for piece in owl.stream(sample_image(), question, max_tokens=32, temperature=0):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    except Owl2Error as e:
        raise _fail(str(e))
    t = _timings(owl)
    err.print(f"vision {t['vision_s']:.2f} s · prefill {t['prefill_tok_per_s']:.0f} tok/s · "
              f"decode {t['decode_tok_per_s']:.0f} tok/s ({owl.decoder.device})")
    console.print("[yellow]The demo model has random weights, so its answer is noise: it shows the "
                  "whole path working. Convert the real release with `owl2 convert` (README).[/]")


def build_demo_model(folder: Path) -> Path:
    import shutil
    make_tiny_checkpoint = _converter()[1].make_tiny_checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    err.print(f"building the demo model in {folder} ...")
    make_tiny_checkpoint(folder / "hf", seed=0)
    _run_convert(folder / "hf", folder / "model", "Q8_0", ["fp32"], force=True)
    return folder / "model"


def main():
    # typer turns Ctrl-C inside a command into exit code 130 without a traceback; this catches
    # one that lands before a command runs (while Python imports).
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
