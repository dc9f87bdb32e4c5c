"""The CLI's options, each defined once and shared by the commands that take it.

A command declares which groups it takes with @with_options; its function then receives one dict
per group (already validated where the API can check it without loading a model):

    @app.command("ask")
    @with_options(RUNTIME, SAMPLING, OUTPUT)
    def ask_cmd(args: list[str] = ..., *, runtime: dict, sampling: dict, output: dict): ...

so ask, chat (and later commands) cannot drift apart in names, defaults or help.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from owl2_edge import names
from owl2_edge.clips import DEFAULT_FRAMES, MAX_FRAMES
from owl2_edge.disk_cache import parse_size
from owl2_edge.errors import ArgumentError
from owl2_edge.load_options import LoadOptions
from owl2_edge.sampling import SamplingParams


@dataclass(frozen=True)
class Opt:
    param: str                          # the key in the group's dict
    type: object
    info: typer.models.OptionInfo


@dataclass(frozen=True)
class Group:
    name: str                           # the keyword the command receives the dict as
    options: tuple[Opt, ...]


def _opt(param, type_, default, *flags, help, panel):
    return Opt(param, type_, typer.Option(default, *flags, help=help, rich_help_panel=panel))


_M = "Model and device"
MODEL = _opt("model", Optional[Path], None, "-m", "--model", panel=_M,
             help="Model folder (default: $OWL2_MODEL, then the demo model).")
_LOAD_OPTIONS = (
    _opt("device", str, LoadOptions.device, "--device", panel=_M, help=f"{', '.join(names.DEVICES)}."),
    _opt("threads", Optional[int], LoadOptions.n_threads, "--threads", "-t", panel=_M,
         help="CPU threads (default: physical cores)."),
    _opt("ctx", int, LoadOptions.n_ctx, "--ctx", panel=_M, help="Context positions (each image takes 65)."),
    _opt("kv_type", str, LoadOptions.kv_type, "--kv-type", panel=_M, help=f"KV cache type: {', '.join(names.KV_TYPES)}."),
    _opt("flash_attn", bool, LoadOptions.flash_attn, "--flash-attn", panel=_M, help="Use ggml's fused attention."),
    _opt("no_repack", bool, not LoadOptions.repack, "--no-repack", panel=_M,
         help="CPU: use the weights in place from the mapped files (instant load; slower matmuls)."),
    _opt("aspect", str, LoadOptions.aspect, "--aspect", panel=_M,
         help="Non-square images: pad (upstream CLI), resize, crop."),
    _opt("no_exif", bool, not LoadOptions.exif_transpose, "--no-exif", panel=_M, help="Ignore EXIF orientation (upstream's pixels)."),
)
RUNTIME = Group("runtime", (MODEL, *_LOAD_OPTIONS))
# For commands that name their model folders as arguments (compare): the same options but -m.
RUNTIME_NO_MODEL = Group("runtime", _LOAD_OPTIONS)

_C = "Disk cache"
# The commands that answer (ask, chat, serve, batch) keep pictures' embeddings and KV prefixes on
# disk by default; the API's default is off (load_options.py).
CACHE = Group("cache", (
    _opt("cache_dir", Optional[Path], None, "--cache-dir", panel=_C,
         help="The cache's folder (default: $OWL2_CACHE_DIR, else ~/.cache/owl2-edge/prefixes)."),
    _opt("no_cache", bool, False, "--no-cache", panel=_C,
         help="Neither read nor write the disk cache."),
    _opt("cache_size", str, "2GiB", "--cache-size", panel=_C,
         help="The cache folder's bound (least recently used entries go first)."),
))

_S = "Sampling"
SAMPLING = Group("sampling", (
    _opt("max_tokens", int, SamplingParams.max_tokens, "--max-tokens", "-n", panel=_S, help="Most tokens to generate."),
    _opt("temperature", float, SamplingParams.temperature, "--temperature", panel=_S, help="0 = greedy; the default is upstream CLI's."),
    _opt("top_k", int, SamplingParams.top_k, "--top-k", panel=_S, help="Keep the k likeliest tokens (0: all)."),
    _opt("top_p", float, SamplingParams.top_p, "--top-p", panel=_S, help="Keep the smallest set with this probability."),
    _opt("min_p", float, SamplingParams.min_p, "--min-p", panel=_S, help="Drop tokens below this share of the likeliest."),
    _opt("repeat_penalty", float, SamplingParams.repeat_penalty, "--repeat-penalty", panel=_S, help="1 = none."),
    _opt("seed", Optional[int], SamplingParams.seed, "--seed", panel=_S, help="Sampling seed (default: random)."),
    _opt("ignore_eos", bool, SamplingParams.ignore_eos, "--ignore-eos", panel=_S, help="Never stop at end-of-text."),
    _opt("stop", Optional[list[str]], None, "--stop", panel=_S,
         help="End the answer where this text first appears, without it (repeatable)."),
    _opt("json_schema", Optional[str], None, "--json-schema", panel=_S,
         help="The answer is JSON that follows this schema (a file, or the JSON itself)."),
    _opt("grammar", Optional[Path], None, "--grammar", panel=_S,
         help="The answer follows this grammar file (llama.cpp's GBNF, or Lark)."),
))

_O = "Output"
OUTPUT = Group("output", (
    _opt("as_json", bool, False, "--json", panel=_O,
         help="One JSON object per answer: text, token_ids, counts, timings."),
    _opt("verbose", bool, False, "--verbose", "-v", panel=_O,
         help="Load, vision, prefill and decode times and tokens/s on stderr."),
))

_V = "Clips (videos, animated pictures)"
CLIPS = Group("clip", (
    _opt("frames", Optional[int], None, "--frames", panel=_V,
         help=f"Frames taken from each clip, evenly spaced in time (1-{MAX_FRAMES}; default "
              f"{DEFAULT_FRAMES}); each takes an image's positions."),
    _opt("start", Optional[float], None, "--start", panel=_V,
         help="Take a clip's frames from this second on."),
    _opt("end", Optional[float], None, "--end", panel=_V,
         help="Take a clip's frames before this second."),
))


def load_kwargs(runtime: dict, cache: dict | None = None) -> dict:
    """The RUNTIME group (and the CACHE group, for the commands that take it) as Owl2.load's
    keyword arguments (LoadOptions' fields and path)."""
    kwargs = dict(path=runtime.get("model"), device=runtime["device"], n_ctx=runtime["ctx"],
                  n_threads=runtime["threads"], kv_type=runtime["kv_type"],
                  flash_attn=runtime["flash_attn"], repack=not runtime["no_repack"],
                  aspect=runtime["aspect"], exif_transpose=not runtime["no_exif"])
    if cache is not None:
        if cache["no_cache"] and cache["cache_dir"] is not None:
            raise ArgumentError("--no-cache and --cache-dir contradict each other: give one")
        if cache["no_cache"]:
            kwargs["cache"] = False
        elif cache["cache_dir"] is not None:
            kwargs["cache"] = str(cache["cache_dir"])
        else:
            kwargs["cache"] = True
        kwargs["cache_size"] = parse_size(cache["cache_size"], "--cache-size")
    return kwargs


def with_options(*groups: Group):
    """Add the groups' options to a command's parameters and pass each group as one dict."""
    def decorate(command):
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)  # the command's own annotations, evaluated
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name not in {g.name for g in groups}]
        added = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=o.info,
                                   annotation=o.type) for g in groups for o in g.options]

        @functools.wraps(command)
        def run(**kwargs):
            for g in groups:
                kwargs[g.name] = {o.param: kwargs.pop(o.param) for o in g.options}
            return command(**kwargs)

        run.__signature__ = signature.replace(parameters=own + added)
        run.__annotations__ = {p.name: p.annotation for p in own + added}
        del run.__wrapped__  # typer must see the new signature, not the command's own
        return run
    return decorate
