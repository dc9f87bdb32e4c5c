"""Commands that make or describe model folders: convert, quantize, imatrix, info, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from owl2_edge.cli.app import (app, console, err, fail, load_owl, progress, progress_when_needed,
                               stage_reporter, write)
from owl2_edge.cli.options import MODEL, RUNTIME, RUNTIME_NO_MODEL, load_kwargs, with_options
from owl2_edge.cli.quality import compare_folders, print_comparison
from owl2_edge.errors import ArgumentError, Owl2Error
from owl2_edge.names import DEFAULT_VISION_VARIANTS, VISION_VARIANT_NOTES
from owl2_edge.tools import converting
from owl2_edge.tools.evaluate import DEFAULT_MAX_TOKENS

_IMATRIX_HELP = ("Importance matrix from `owl2 imatrix` (the very low-bit types need one; "
                 "see docs/quantize.md).")
_TENSOR_TYPE_HELP = ("PATTERN=TYPE (repeatable): matrices whose GGUF name matches the regular "
                     "expression take this ggml type (Q6_K, Q4_K, IQ4_XS, F16, ...); the "
                     "sidecar's are named owl2.mam.blk.N.attn_k.weight; the first match wins.")
_OUTPUT_TYPE_HELP = "Type of output.weight (the head), e.g. Q6_K."
_TOKEN_EMBD_TYPE_HELP = "Type of token_embd.weight, e.g. Q4_K."
_VISION_HELP = ("Vision file(s) to write (repeatable): "
                + ", ".join(f"{v} ({note})" for v, note in VISION_VARIANT_NOTES.items()) + ".")


@app.command("convert")
def convert_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face mPLUG-Owl2 checkpoint folder, or a Hub "
                                            "id (MAGAer13/mplug-owl2-llama2-7b) to download."),
    out: Path = typer.Option(..., "-o", "--out", help="Model folder to write."),
    quant: str = typer.Option("Q4_K_M", "--quant", "-q",
                              help="Decoder type: F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, ..."),
    vision: list[str] = typer.Option(list(DEFAULT_VISION_VARIANTS), "--vision", help=_VISION_HELP),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help=_TENSOR_TYPE_HELP),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type",
                                                     help=_OUTPUT_TYPE_HELP),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help=_TOKEN_EMBD_TYPE_HELP),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help=_IMATRIX_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
):
    """Convert a Hugging Face mPLUG-Owl2 checkpoint into an owl2-edge model folder."""
    from owl2_edge import recipe
    try:
        overrides = recipe.overrides_of(tensor_type or (), output_tensor_type,
                                        token_embedding_type)
        importance = _read_imatrix(imatrix)
        with progress() as bar:
            manifest = converting.convert(hf_dir, out, quant, vision, force, importance,
                                          progress=stage_reporter(bar), overrides=overrides)
    except (Owl2Error, FileExistsError, ValueError) as e:
        raise fail(str(e))
    size = sum((out / f).stat().st_size for f in manifest.files())
    console.print(f"wrote {out} ({size / 2**20:.1f} MiB, decoder {manifest.quant})")


@app.command("info")
def info_cmd(
    folder: Optional[Path] = typer.Argument(None, metavar="MODEL",
                                            help="Model folder (default: as ask's -m)."),
    model: Optional[Path] = MODEL.info,
    verify: bool = typer.Option(False, "--verify",
                                help="Also read every file whole and compare it with the sha256 "
                                     "the manifest records (a load samples them)."),
    record: bool = typer.Option(False, "--record",
                                help="For a folder converted before owl2-edge recorded its "
                                     "files: check it as a load does, then write its files' "
                                     "sizes and sha256 into its manifest."),
):
    """Show what is in a model folder: files, sizes, types, dimensions."""
    from owl2_edge.tools.info import describe, record as record_files, verify as verify_files
    from owl2_edge.model_dir import default_model_path
    if folder is not None and model is not None and folder != model:
        raise fail(f"two model folders given ({folder} and -m {model}); give one")
    path = folder or model or default_model_path()
    if record:
        try:
            n = record_files(path)
        except Owl2Error as e:
            raise fail(str(e))
        console.print(f"recorded the size and sha256 of {n} files in {escape(str(path))}")
        return
    try:
        console.print(describe(path))
        if not verify:
            return
        found = verify_files(path)
    except Owl2Error as e:
        raise fail(str(e))
    for name, same in found.items():
        console.print(f"{escape(name)}: " + ("matches the manifest's sha256" if same else
                                             "no sha256 recorded (a folder written before "
                                             "owl2-edge recorded them)" if same is None else
                                             "[red]DOES NOT MATCH the manifest's sha256[/]"))
    changed = [name for name, same in found.items() if same is False]
    if changed:
        raise fail(f"{', '.join(changed)}: not the file the manifest records (altered or "
                   f"swapped); copy or convert the model folder again")


@app.command("quantize")
@with_options(RUNTIME_NO_MODEL)
def quantize_cmd(
    src: Path = typer.Argument(..., help="Model folder to quantize (F16, BF16 or F32)."),
    out: Path = typer.Option(..., "-o", "--out", help="Model folder to write."),
    quant: Optional[str] = typer.Option(
        None, "--quant", "-q", help="Decoder type: Q4_K_M, Q8_0, IQ4_XS, ... (or --target-size)."),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help=_TENSOR_TYPE_HELP),
    output_tensor_type: Optional[str] = typer.Option(None, "--output-tensor-type",
                                                     help=_OUTPUT_TYPE_HELP),
    token_embedding_type: Optional[str] = typer.Option(None, "--token-embedding-type",
                                                       help=_TOKEN_EMBD_TYPE_HELP),
    target_size: Optional[str] = typer.Option(
        None, "--target-size", help="Choose every tensor's type by measurement so that both GGUF "
                                    "files fit this size (bytes, or 1.6MiB, 2.8GiB)."),
    target_bpw: Optional[float] = typer.Option(
        None, "--target-bpw", help="As --target-size, in bits per weight of the decoder pair."),
    calibration: Optional[int] = typer.Option(
        None, "--calibration",
        help="With --target-*: generated calibration questions per question type (default 16)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="With --target-*: calibration questions from a JSONL file (as owl2 "
                             "eval's --data) instead of generated ones."),
    estimate: str = typer.Option(
        "measured", "--estimate",
        help="With --target-*: measured (a KL pass for every type of every tensor group) or "
             "scaled (two per group, at its lowest type and Q4_K, the others from their "
             "rounding errors: 3.5x fewer passes, for large models)."),
    fresh: bool = typer.Option(
        False, "--fresh", help="With --target-*: measure every group again, not taking the costs "
                               "an earlier run on this source kept (~/.cache/owl2-edge/"
                               "sensitivities)."),
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
    """Quantize a model folder to a type, or to a size with per-tensor types chosen by
    measurement: no torch and no checkpoint needed."""
    from owl2_edge import recipe
    from owl2_edge.tools import evaluate
    from owl2_edge.tools.quantize import quantize_folder
    try:
        targeted = target_size is not None or target_bpw is not None
        overrides = recipe.overrides_of(tensor_type or (), output_tensor_type,
                                        token_embedding_type)
        if targeted and (quant is not None or overrides):
            raise ArgumentError("--target-size/--target-bpw choose every tensor's type: leave "
                                "out --quant, --tensor-type and the other per-tensor options")
        if not targeted and quant is None:
            raise ArgumentError("give --quant TYPE, or --target-size/--target-bpw")
        if not targeted and (data is not None or calibration is not None
                             or estimate != "measured" or fresh):
            raise ArgumentError("--calibration, --data, --estimate and --fresh go with "
                                "--target-size/--target-bpw")
        importance = _read_imatrix(imatrix)
        if targeted:
            manifest = _quantize_to_target(src, out, target_size, target_bpw, calibration, data,
                                           estimate, vision, importance, force, runtime, fresh)
        else:
            with progress() as bar:
                manifest = quantize_folder(src, out, quant, vision, importance, allow_requantize,
                                           force, progress=stage_reporter(bar),
                                           overrides=overrides)
        size = sum((out / f).stat().st_size for f in manifest.files())
        changed = len(manifest.recipe.get("changed", {}))
        err.print(f"wrote {out} ({size / 2**20:.1f} MiB, decoder {manifest.quant}"
                  f"{f' with {changed} matrices retyped' if changed else ''}, vision "
                  f"{', '.join(manifest.vision_files)})")
        if report:
            items = evaluate.generated_items(report_n, 0)
            print_comparison(compare_folders(src, out, items, runtime, DEFAULT_MAX_TOKENS), src, out,
                              as_json)
    except (Owl2Error, FileExistsError, ValueError) as e:
        raise fail(str(e))


def _quantize_to_target(src, out, target_size, target_bpw, calibration, data, estimate,
                        vision, importance, force, runtime, fresh):
    from owl2_edge import checks
    from owl2_edge.owl2 import Owl2
    from owl2_edge.tools import choose, evaluate
    # tools.choose loads gguf-py & co.: only when a recipe is chosen (the CLI's import stays light)
    if calibration is None:
        calibration = choose.DEFAULT_CALIBRATION
    checks.integer("--calibration", calibration, 1, 1000)
    if data is not None:  # the file's questions measure the groups and check the choice
        items = check_items = evaluate.read_items(data, need_answers=False)
    else:
        items, check_items = choose.generated_sets(calibration)
    target = choose.target_from(target_size, target_bpw, src, Owl2.check_folder(src))
    kwargs = load_kwargs(runtime)
    with progress() as bar:
        manifest, choice = choose.quantize_to_target(
            src, out, target, lambda path: Owl2.load(**{**kwargs, "path": path}), importance,
            vision, force, items, stage_reporter(bar), estimate, check_items, fresh=fresh)
    for line in choose.describe(choice):
        err.print(escape(line), highlight=False)
    return manifest


def _read_imatrix(path: Optional[Path]):
    if path is None:
        return None
    from owl2_edge.tools.imatrix import ImportanceMatrix
    return ImportanceMatrix.read(path)


@app.command("imatrix")
@with_options(RUNTIME)
def imatrix_cmd(
    out: Path = typer.Option(..., "-o", "--out",
                             help="Importance matrix file to write (.gguf); not a folder or a "
                                  "device. Written beside it, then renamed into place."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="JSONL calibration prompts: image (optional) and question (or "
                             "text), answer optional, per line; a regular file of UTF-8 text. "
                             "Default: built-in pictures."),
    n_prompts: int = typer.Option(64, "--prompts", help="How many built-in prompts."),
    seed: int = typer.Option(0, "--seed", help="Which built-in prompts."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    *, runtime: dict,
):
    """Collect an importance matrix through the MAM decoder, images included (for --imatrix)."""
    from owl2_edge import checks, outputs
    from owl2_edge.tools import evaluate, imatrix
    try:
        outputs.check_target(out, force)  # now, not after the model has run every prompt
        if data is not None:
            prompts = imatrix.prompts_from_items(evaluate.read_items(data, need_answers=False))
            dataset = str(data)
        else:
            prompts = imatrix.calibration_prompts(checks.integer("--prompts", n_prompts, 1), seed)
            dataset = f"owl2-edge built-in scenes (n={n_prompts}, seed={seed})"
        with load_owl(runtime) as owl, progress() as bar:
            task = bar.add_task("imatrix", total=len(prompts))
            result = imatrix.collect(owl, prompts, dataset,
                                     on_progress=lambda done, total: bar.update(task, completed=done))
        result.write(out, replace=force)
    except Owl2Error as e:
        raise fail(str(e))
    visual = sum(e.count for e in result.mam.values()) // max(len(result.mam), 1)
    err.print(f"wrote {out}: {len(result.base)} base and {len(result.mam)} visual-route matrices "
              f"from {result.chunk_count} prompts ({visual} image positions per visual matrix)")


@app.command("demo")
def demo_cmd(
    rebuild: bool = typer.Option(False, "--rebuild", help="Convert the demo model again."),
    question: Optional[str] = typer.Option(None, "--question", "-q",
                                           help="Ask this about the first sample picture instead."),
):
    """Build the demo model once (a tiny mPLUG-Owl2 trained on pictures of shapes; offline) and
    ask it about the sample pictures and the sample clip."""
    from owl2_edge.tools import demo_image
    from owl2_edge.tools.info import describe
    from owl2_edge.model_dir import demo_folder
    from owl2_edge.owl2 import Owl2
    folder = demo_folder()

    def ask(images, q: str, expected: str | None) -> None:
        console.print(f"[bold]USER:[/] {escape(q)}")
        console.print("[bold]ASSISTANT:[/] ", end="")
        pieces = []
        for piece in owl.stream(images, q, max_tokens=96, temperature=0):
            pieces.append(piece)
            write(piece)
        answer = "".join(pieces)
        console.print("" if expected is None else "   [green](right)[/]" if answer == expected
                      else f"   [red](expected {escape(expected)})[/]")

    try:
        with progress_when_needed() as on_stage:  # bars only when the model is built
            model = converting.ensure_demo_model(
                folder, rebuild, progress=on_stage,
                on_build=lambda: err.print(f"building the demo model in {folder} ..."))
        console.print(describe(model))
        owl = Owl2.load(model)
        for i in range(1 if question else len(demo_image.SAMPLES)):
            image = demo_image.sample_image(i)  # drawn once, saved and asked about
            picture = folder / f"sample-{i + 1}.png"
            image.save(picture)
            console.print(f"[bold]picture:[/] {escape(str(picture))}")
            if question:
                ask(image, question, None)
                continue
            for q, expected in demo_image.sample_questions(i):
                ask(image, q, expected)
            if i == 0:
                ask(image, *demo_image.sample_json(i))
        if not question:
            clip = folder / "sample-clip.gif"
            frames = demo_image.save_sample_clip(clip)
            console.print(f"[bold]clip:[/] {escape(str(clip))} (an animated GIF of "
                          f"{len(frames)} frames: each is an image slot, in time order)")
            ask(clip, *demo_image.sample_clip_question())
    except Owl2Error as e:
        raise fail(str(e))
    t = owl.stats.rates(owl.load_seconds)
    err.print(f"load {t['load_s']:.2f} s · vision {t['vision_s']:.3f} s · prefill "
              f"{t['prefill_tok_per_s']:.0f} tok/s · decode {t['decode_tok_per_s']:.0f} tok/s "
              f"({owl.decoder.device})")
