"""How a model folder is loaded: every load option, its default and its check, once.

    options = LoadOptions.of({"n_ctx": 4096, "device": "cpu"})   # ArgumentError on a bad one

The CLI's options take their defaults from here (cli/options.py), Owl2.load builds one object
and hands it down to Decoder (which checks nothing again), and the server and batch load
through Owl2.load: no default or rule is written twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from owl2_edge import checks
from owl2_edge.disk_cache import DEFAULT_CACHE_BYTES, default_cache_dir, parse_size
from owl2_edge.errors import ArgumentError
from owl2_edge._decoder import MAX_SEQUENCES
from owl2_edge.image import ASPECT_MODES
from owl2_edge.names import DEVICES, KV_TYPES

# The largest context the native decoder allocates (positions, text and image alike).
MAX_CTX = 1 << 20

# Positions per graph: longer runs are split (a pass's memory stays bounded).
DEFAULT_UBATCH = 512


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int = 2048             # positions the KV cache holds (each image takes n_visual)
    n_threads: int | None = None  # CPU threads; None: the native rule (_decoder.default_n_threads)
    device: str = "auto"          # "auto" (a GPU when ggml has one), "cpu" or "cuda"
    n_gpu_layers: int = -1        # with a GPU, how many of the last layers run there (-1: all)
    kv_type: str = "f16"          # the KV cache's type
    flash_attn: bool = False      # ggml's fused attention (always on with a GPU: see decoder.py)
    repack: bool = True           # CPU: ggml's interleaved weight layouts (docs/design.md §5)
    aspect: str = "pad"           # how a non-square picture becomes square (image.py)
    exif_transpose: bool = True   # turn pictures upright by their EXIF orientation
    parallel: int = 1             # answers decoded together; each may hold n_ctx // parallel
    # Keep image embeddings and KV prefixes on disk for later processes (docs/cache.md): False,
    # True (the default folder: $OWL2_CACHE_DIR, else the user's cache folder) or a folder.
    cache: bool | str = False
    cache_size: int | str = DEFAULT_CACHE_BYTES  # the folder's bound, bytes or "2GiB"

    def __post_init__(self):
        # Frozen: the checked (and normalised) values are written through object.__setattr__.
        def put(name, value):
            object.__setattr__(self, name, value)
        put("n_ctx", checks.integer("n_ctx", self.n_ctx, 1, MAX_CTX))
        put("n_threads", checks.threads("n_threads", self.n_threads))
        put("device", checks.choice("device", self.device, DEVICES))
        put("n_gpu_layers", checks.integer("n_gpu_layers", self.n_gpu_layers, -1, MAX_CTX))
        put("kv_type", checks.choice("kv_type", self.kv_type, KV_TYPES))
        put("flash_attn", checks.flag("flash_attn", self.flash_attn))
        put("repack", checks.flag("repack", self.repack))
        put("aspect", checks.choice("aspect", self.aspect, ASPECT_MODES))
        put("exif_transpose", checks.flag("exif_transpose", self.exif_transpose))
        put("parallel", checks.integer("parallel", self.parallel, 1, MAX_SEQUENCES))
        if isinstance(self.cache, os.PathLike) or (isinstance(self.cache, str) and self.cache):
            put("cache", os.fspath(self.cache))
        elif not isinstance(self.cache, bool):
            raise ArgumentError(f"cache must be True, False or a folder, not {self.cache!r}")
        put("cache_size", parse_size(self.cache_size, "cache_size"))
        if self.n_ctx // self.parallel < 1:
            raise ArgumentError(f"n_ctx {self.n_ctx} is too small for {self.parallel} parallel "
                                "answers")

    @classmethod
    def of(cls, options: dict, allowed: tuple[str, ...] | None = None) -> "LoadOptions":
        """From keyword options as the API takes them, refusing names it does not know (or,
        with `allowed`, names outside it: Decoder takes the decoder's options only)."""
        known = allowed if allowed is not None else tuple(f.name for f in fields(cls))
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ArgumentError(f"unknown option {unknown[0]!r}; known: {', '.join(known)}")
        return cls(**options)

    @classmethod
    def given(cls, options: "LoadOptions | None", keywords: dict,
              allowed: tuple[str, ...] | None = None) -> "LoadOptions":
        """The options of a call that takes either options=LoadOptions(...) or the same options
        as keywords (Owl2.load, Decoder), never both."""
        if options is None:
            return cls.of(keywords, allowed)
        if not isinstance(options, LoadOptions) or keywords:
            raise ArgumentError("give options=LoadOptions(...) or keyword options, not both")
        return options

    def decoder_args(self) -> dict:
        """The native decoder's share of the options."""
        return {name: getattr(self, name) for name in DECODER_OPTIONS}

    @property
    def window(self) -> int:
        """The positions one answer may hold: the cache is shared by `parallel` answers."""
        return self.n_ctx // self.parallel

    @property
    def cache_dir(self) -> str | None:
        """The disk cache's folder, or None when there is none."""
        if self.cache is False:
            return None
        return str(default_cache_dir()) if self.cache is True else self.cache

    @property
    def vision_device(self) -> str:
        """Where the vision model may run: the decoder is where a GPU matters, so a decoder on
        "cuda" lets the vision model take ONNX Runtime's CUDA provider when it can start it
        ("auto"), and the CPU otherwise (owl.vision.provider says which)."""
        return "cpu" if self.device == "cpu" else "auto"


# The options the decoder itself takes (aspect and EXIF are the pictures').
DECODER_OPTIONS = ("n_ctx", "n_threads", "device", "n_gpu_layers", "kv_type", "flash_attn",
                   "repack")
