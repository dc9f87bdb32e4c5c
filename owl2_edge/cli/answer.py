"""`owl2 ask` and `owl2 chat`: one question, or a conversation, on the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from owl2_edge.cli.app import app, check_sampling, err, fail, load_owl, write
from owl2_edge.cli.options import CACHE, CLIPS, OUTPUT, RUNTIME, SAMPLING, with_options
from owl2_edge import clips
from owl2_edge.errors import Owl2Error

def report_answer(owl, stats, output: dict, text: str) -> None:
    """After an answer: its JSON object (--json) and its timings (--verbose)."""
    if output["as_json"]:
        print(json.dumps({
            "text": text, "token_ids": stats.tokens, "tokens": stats.generated_tokens,
            "prompt_tokens": stats.prompt_positions, "finish_reason": stats.finish_reason,
            "reused_positions": stats.reused_positions, "disk_positions": stats.disk_positions,
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


@app.command("ask")
@with_options(RUNTIME, SAMPLING, OUTPUT, CACHE, CLIPS)
def ask_cmd(
    args: list[str] = typer.Argument(..., metavar="IMAGE... QUESTION",
                                     help="Zero or more images, then the question."),
    raw: bool = typer.Option(False, "--raw", help="QUESTION is the whole prompt (no template); "
                                                  "<|image|> marks each image's place."),
    no_stream: bool = typer.Option(False, "--no-stream", help="Print the answer at the end."),
    *, runtime: dict, sampling: dict, output: dict, cache: dict, clip: dict,
):
    """Ask a question about images or clips: owl2 ask photo.jpg "What is written on the sign?"."""
    images, question = args[:-1], args[-1]
    streaming = not (no_stream or output["as_json"])
    pieces: list[str] = []
    try:
        check_sampling(sampling)
        images = clips.sampled(images, **clip)  # refused before the model loads
        owl = load_owl(runtime, cache)
        answer = owl.stream(images, question, raw=raw, **sampling)
        for piece in answer:
            pieces.append(piece)
            if streaming:
                write(piece)
    except Owl2Error as e:
        if streaming and pieces:
            sys.stdout.write("\n")
        raise fail(str(e))
    text = "".join(pieces)
    if not output["as_json"]:
        print(text if no_stream else "", flush=True)  # before --verbose's line on stderr
    report_answer(owl, answer.stats, output, text)


@app.command("chat")
@with_options(RUNTIME, SAMPLING, OUTPUT, CACHE, CLIPS)
def chat_cmd(
    image: Optional[Path] = typer.Argument(None, help="An image to talk about (more with /image)."),
    warm: bool = typer.Option(True, "--warm/--no-warm",
                              help="Read each picture as soon as it is given, while the question "
                                   "is typed (--no-warm: when the question is sent)."),
    *, runtime: dict, sampling: dict, output: dict, cache: dict, clip: dict,
):
    """Talk about images: /image PATH adds one (/video PATH a clip), /clear starts over, /exit
    (or Ctrl-D) leaves."""

    def sampled(path):
        """A clip sampled as --frames/--start/--end say; a picture as it is."""
        if any(v is not None for v in clip.values()) and clips.clip_kind(path) is not None:
            return clips.Clip(path, **{k: v for k, v in clip.items() if v is not None})
        return path
    try:
        check_sampling(sampling)
        if image is not None:
            image = sampled(image)
        owl = load_owl(runtime, cache)
        chat = owl.chat([image] if image else [], warm=warm)
    except Owl2Error as e:
        raise fail(str(e))
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
        if line.startswith(("/image", "/video")):
            try:
                chat.add_image(sampled(line[len("/image"):].strip()))  # a clip, or a picture
            except Owl2Error as e:
                err.print(f"error: {e}", markup=False)
            continue
        pieces: list[str] = []
        try:
            for piece in chat.send(line, **sampling):
                pieces.append(piece)
                if not output["as_json"]:
                    write(piece)
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
        report_answer(owl, chat.stats, output, "".join(pieces))
