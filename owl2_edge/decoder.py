"""The MAM decoder: a thin wrapper over the native `_decoder` (cpp_ext/, ggml).

    with Decoder(base_gguf, mam_gguf) as dec:
        dec.eval_tokens(prompt_ids)          # a text run (route 0)
        dec.eval_embeddings(image_embeds)    # an image run (route 1), [n_visual, n_embd]
        logits = dec.eval_tokens(question_ids)

Each call is one run of one modality, appended after the `n_past` positions already in the KV
cache; it returns the logits of its last position (or of every position with all_logits=True).
The cache may hold several sequences (eval_sequences: one decode step for many answers at
once); a caller that never names one uses sequence 0. Numpy in, numpy out; the native errors
become DecoderError / ContextFullError here.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from typing import Iterator, Sequence

import numpy as np

from owl2_edge import _decoder, checks
from owl2_edge.errors import ContextFullError, DecoderError
from owl2_edge.load_options import DECODER_OPTIONS, DEFAULT_UBATCH, MAX_CTX, LoadOptions
from owl2_edge.names import IMAGE_TOKEN_ID, TEXT_ROUTE, VISUAL_ROUTE

# The first touch of ggml's device registry makes a CUDA build print its devices; do it here,
# quietly, before llama_cpp or anything else can.
_decoder.init_backends()

# A KV cache snapshot (one sequence's positions), from save_state(); opaque to callers.
KVState = _decoder.KVState

# Sequences the KV cache holds at most (ids 0 .. MAX_SEQUENCES - 1).
MAX_SEQUENCES = _decoder.MAX_SEQUENCES

# The model's facts, read once when the pair opens (before its weights are placed).
_FACTS = ("n_vocab", "n_embd", "n_ctx", "n_layer", "n_threads", "device", "kv_type", "flash_attn",
          "cache_layout")

# Decoders whose weights are being placed on a background thread. At exit each is told to stop
# and waited for: the thread must not be inside ggml while the interpreter and ggml are torn down.
_loading: "weakref.WeakSet[Decoder]" = weakref.WeakSet()


@atexit.register
def _stop_loading() -> None:
    for decoder in list(_loading):
        decoder._native.cancel_loading()
        decoder._loader.join()


@contextlib.contextmanager
def _native_errors() -> Iterator[None]:
    """The runtime's error types for the native ones (raised once, where the fact is known)."""
    try:
        yield
    except _decoder.NativeContextFullError as e:
        raise ContextFullError(str(e)) from None
    except _decoder.NativeDecoderError as e:
        raise DecoderError(str(e)) from None


class Decoder:
    """LLaMA-2 with the Modality-Adaptive Module, from a base GGUF and its MAM sidecar.

    options: a LoadOptions (load_options.py: n_ctx, n_threads, device, n_gpu_layers, kv_type,
        flash_attn, repack, each with its default and its meaning there), or the same as keyword
        arguments (the decoder's ones only). Owl2.load passes the object it has checked.
        flash_attn is always on when a GPU is used (cpp_ext/owl2_load.cpp, choose_devices: the
        unfused path was wrong on CUDA in our measurement). repack: on the CPU, copy the weights
        that ggml can repack into its interleaved layouts, as stock llama.cpp does (at 7B Q4_0 on
        2 cores, 1.5x the prefill and decode speed of the weights used in place); the mapped
        pages of each copied weight are given back at once, so memory holds the weights once.
    n_ubatch: positions per graph; longer runs are split (memory stays bounded).
    background: return once both files and every option are checked and the facts (n_vocab,
        n_embd, ...) are known, and place the weights on a thread meanwhile (CPU repacking uses
        n_threads workers). Every call that needs the weights waits for it (wait() does only
        that); a failure to place them (out of memory) is raised there as DecoderError.
    """

    def __init__(self, decoder_gguf: str | os.PathLike, mam_gguf: str | os.PathLike,
                 options: LoadOptions | None = None, *, n_ubatch: int = DEFAULT_UBATCH,
                 background: bool = False, **option_kwargs):
        options = LoadOptions.given(options, option_kwargs, allowed=DECODER_OPTIONS)
        native_options = options.decoder_args()
        native_options["n_threads"] = options.n_threads or 0  # the native default rule
        native_options["n_ubatch"] = checks.integer("n_ubatch", n_ubatch, 1, MAX_CTX)
        background = checks.flag("background", background)
        base = checks.path("decoder_gguf", decoder_gguf)
        mam = checks.path("mam_gguf", mam_gguf)
        # Loading is two steps (cpp_ext/owl2_load.cpp, open and place): opening checks both
        # files and every option and is quick; placing reads, repacks or uploads the weights.
        with _native_errors():
            self._native = _decoder.Decoder(base, mam, **native_options, defer_placing=True)
            self._facts = {name: getattr(self._native, name) for name in _FACTS}
        self._load_error: DecoderError | None = None
        self._loader = threading.Thread(target=self._place, name="owl2-decoder-load", daemon=True)
        if background:
            _loading.add(self)
            self._loader.start()
        else:
            self._loader.run()
            self.wait()

    def _place(self) -> None:
        try:
            with _native_errors():
                self._native.finish_loading()
        except DecoderError as e:
            self._load_error = e
            self._native.close()  # what was placed before the failure is freed at once
        finally:
            _loading.discard(self)

    def wait(self) -> None:
        """Return once the weights are placed (at once unless loading in the background); raise
        the DecoderError that stopped it, on this and every later call."""
        if self._loader.is_alive():
            self._loader.join()
        if self._load_error is not None:
            raise DecoderError(str(self._load_error))

    @property
    def ready(self) -> bool:
        """Whether the weights are placed (a background load has finished without error)."""
        return not self._loader.is_alive() and self._load_error is None

    # -- runs ------------------------------------------------------------------------------------

    def eval_tokens(self, ids: Sequence[int] | np.ndarray, all_logits: bool = False,
                    route: int = TEXT_ROUTE) -> np.ndarray:
        """A run of text token ids -> float32 logits [n_vocab] (last position) or [n, n_vocab].
        `route` exists for tests that show what the wrong route does; callers leave it alone."""
        return self.eval_runs([self._checked_ids(ids)], all_logits, routes=[route])

    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False,
                        route: int = VISUAL_ROUTE) -> np.ndarray:
        """A run of embeddings [n, n_embd] (an image's, normally) -> logits like eval_tokens.
        Routed visual unless `route` says otherwise (tests only)."""
        return self.eval_runs([self._checked_embeds(embeds)], all_logits, routes=[route])

    def eval_runs(self, runs: Sequence, all_logits: bool = False,
                  routes: Sequence[int] | None = None, seq: int = 0) -> np.ndarray:
        """Consecutive runs of sequence `seq` in one pass: each a list of token ids (text route)
        or a float array of embeddings [n, n_embd] (visual route), e.g. [ids before the image,
        its embeddings, ids after]. Q, O and the MLP multiply every position at once; each run's
        positions take its route's norms and K/V. Logits like eval_tokens, over all the runs'
        positions. `routes`: one per run instead of by kind (tests only)."""
        seq = self._checked_seq(seq)
        logits = self._eval([(seq, runs, routes)], all_logits)
        return logits if all_logits else logits[0]

    def eval_capturing(self, runs: Sequence, layers: Sequence[int], seq: int = 0
                       ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """eval_runs with all_logits, also giving the hidden states at the input of each of
        `layers` (n_layer: the final norm's input): (logits, {layer: float32 [positions,
        n_embd]}). What eval_from_layer starts from."""
        seq = self._checked_seq(seq)
        layers = sorted(set(layers))
        logits, states = self._eval([(seq, runs, None)], True, capture=layers)
        return logits, dict(zip(layers, states))

    def eval_from_layer(self, states: np.ndarray, routes: Sequence[int] | np.ndarray,
                        first_layer: int, seq: int = 0) -> np.ndarray:
        """The logits of every position [positions, n_vocab] of a pass that starts at layer
        `first_layer`'s input from `states` [positions, n_embd] (eval_capturing's), each position
        through its route (`routes`, one per position) in the layers from there on; the layers
        before are skipped, and their cache cells for these positions are left unwritten (go on
        with such a sequence only by passes from the same layer or later). The recipe chooser's
        pass for a group in a later band of layers (docs/design.md §11)."""
        seq = self._checked_seq(seq)
        first_layer = checks.integer("first_layer", first_layer, 0, self.n_layer)
        states = self._checked_embeds(states)
        routes = np.asarray(routes)
        if routes.shape != (len(states),) or not np.isin(routes, (TEXT_ROUTE, VISUAL_ROUTE)).all():
            raise DecoderError(f"routes must hold one of {TEXT_ROUTE}, {VISUAL_ROUTE} per position "
                               f"({len(states)}), got shape {routes.shape}")
        cuts = np.flatnonzero(np.diff(routes)) + 1  # runs of one route
        runs = np.split(states, cuts)
        run_routes = [int(routes[0])] + [int(routes[c]) for c in cuts]
        return self._eval([(seq, runs, run_routes)], True, first_layer=first_layer)

    def eval_sequences(self, batch: Sequence[tuple[int, Sequence]], all_logits: bool = False
                       ) -> np.ndarray:
        """Several sequences in one pass: (seq, runs) pairs, each sequence at most once, its runs
        as eval_runs takes them, appended to that sequence. A decode step is one token of each:
        [(0, [[t0]]), (3, [[t3]])]. Every position sees only its own sequence's keys
        (docs/design.md §14). Returns float32 logits [len(batch), n_vocab], one row per sequence
        (its last position) in the order given, or with all_logits [positions, n_vocab]."""
        seqs = [self._checked_seq(seq) for seq, _ in batch]
        if len(set(seqs)) != len(seqs):
            raise DecoderError("each sequence at most once in eval_sequences")
        return self._eval([(seq, runs, None) for seq, (_, runs) in zip(seqs, batch)], all_logits)

    def _eval(self, batch, all_logits: bool, first_layer: int = 0, capture: Sequence[int] = ()):
        native_runs = []
        for seq, runs, routes in batch:
            checked = [self._checked_embeds(run) if isinstance(run, np.ndarray)
                       and np.issubdtype(run.dtype, np.floating) else self._checked_ids(run)
                       for run in runs]
            if not checked:
                raise DecoderError("nothing to evaluate (no runs)")
            if routes is None:
                routes = [TEXT_ROUTE if run.dtype == np.int32 else VISUAL_ROUTE for run in checked]
            if len(routes) != len(checked):
                raise DecoderError(f"{len(routes)} routes for {len(checked)} runs")
            native_runs += [(run, int(route), seq) for run, route in zip(checked, routes)]
        if not native_runs:
            raise DecoderError("nothing to evaluate (no sequences)")
        self.wait()
        with _native_errors():
            return self._native.eval_runs(native_runs, bool(all_logits), first_layer, list(capture))

    def _checked_seq(self, seq) -> int:
        return checks.integer("seq", seq, 0, MAX_SEQUENCES - 1)

    def _checked_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise DecoderError(f"ids must be a non-empty 1-D list of integers, got shape {ids.shape} "
                               f"of {ids.dtype}")
        if (ids == IMAGE_TOKEN_ID).any():
            raise DecoderError(f"ids contain the image slot id {IMAGE_TOKEN_ID}: splice the prompt "
                               "into runs and give each image's embeddings as a run of its own")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise DecoderError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        return np.ascontiguousarray(ids, dtype=np.int32)

    def _checked_embeds(self, embeds: np.ndarray) -> np.ndarray:
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[0] == 0 or embeds.shape[1] != self.n_embd:
            raise DecoderError(f"embeddings must be [n, {self.n_embd}] with n >= 1, got "
                               f"{list(embeds.shape)}")
        if not np.isfinite(embeds).all():
            raise DecoderError("embeddings contain NaN or infinity")
        return embeds

    # -- the cache -------------------------------------------------------------------------------

    # The cache is shared by up to MAX_SEQUENCES sequences, each its own positions 0, 1, ...
    # (docs/design.md §14). A caller with one sequence never names one: it is sequence 0.

    @property
    def n_past(self) -> int:
        """Positions sequence 0 holds in the KV cache (spliced: each image counts n_visual)."""
        return self.n_past_of(0)

    def n_past_of(self, seq: int) -> int:
        """Positions sequence `seq` holds."""
        seq = self._checked_seq(seq)
        self.wait()
        with _native_errors():
            return self._native.n_past(seq)

    @property
    def n_free(self) -> int:
        """Cache cells no sequence holds (what every sequence together may still add)."""
        self.wait()
        with _native_errors():
            return self._native.n_free()

    def rewind(self, n: int, seq: int = 0) -> None:
        """Forget the last n positions of a sequence (e.g. a rejected continuation)."""
        seq = self._checked_seq(seq)
        self.wait()
        with _native_errors():
            self._native.rewind(int(n), seq)

    def clear_sequence(self, seq: int) -> None:
        """Forget every position of a sequence; its cells are free for the others."""
        seq = self._checked_seq(seq)
        self.wait()
        with _native_errors():
            self._native.clear_sequence(seq)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Make `dst` hold what `src` holds (a shared prompt, then different continuations).
        The two share the cells of those positions: nothing is copied, no cell is used."""
        src, dst = self._checked_seq(src), self._checked_seq(dst)
        self.wait()
        with _native_errors():
            self._native.copy_sequence(src, dst)

    def start_importance(self) -> None:
        """Collect, from now on, what each weight matrix's inputs add up to (owl2_edge/imatrix.py);
        runs are slower meanwhile. Clears anything collected before."""
        self.wait()
        with _native_errors():
            self._native.start_importance()

    def take_importance(self) -> dict[str, tuple[np.ndarray, int]]:
        """What was collected since start_importance, and stop: {ggml weight name: (sum of
        squared inputs per column, float32 [n_per_row]; positions)}. The sidecar's weights are
        named like the base's with ".visual" added."""
        self.wait()
        with _native_errors():
            return self._native.take_importance()

    def override_weights(self, matrices: dict[tuple[str, bool], tuple[int, np.ndarray]]) -> None:
        """Replace weight matrices until clear_overrides(): {(name as the base names it, whether
        the sidecar's copy): (ggml type, its encoding of the matrix, uint8)}. The recipe chooser
        measures a group lowered this way, without writing a pair (tools/choose.py). All or
        none: on an error the ones replaced so far are put back."""
        self.wait()
        with _native_errors():
            try:
                for (name, visual), (ggml_type, data) in matrices.items():
                    self._native.override_weight(name, bool(visual), int(ggml_type),
                                                 np.ascontiguousarray(data, dtype=np.uint8).reshape(-1))
            except BaseException:
                self._native.clear_overrides()
                raise

    def clear_overrides(self) -> None:
        """Every weight replaced by override_weights back to the loaded one."""
        self.wait()
        with _native_errors():
            self._native.clear_overrides()

    def save_state(self, seq: int = 0, n_positions: int | None = None) -> KVState:
        """A copy of a sequence's first n_positions positions (None: all it holds), to resume
        from later (prefix reuse; owl2_edge/disk_cache.py writes it out)."""
        seq = self._checked_seq(seq)
        n_positions = -1 if n_positions is None else checks.integer("n_positions", n_positions,
                                                                    0, MAX_CTX)
        self.wait()
        with _native_errors():
            return self._native.save_state(seq, n_positions)

    def restore_state(self, state: KVState, seq: int = 0) -> None:
        """Back to a saved state: the sequence holds what it (or another) held at save_state()."""
        if not isinstance(state, KVState):
            raise DecoderError(f"not a decoder state: {type(state).__name__}")
        seq = self._checked_seq(seq)
        self.wait()
        with _native_errors():
            self._native.restore_state(state, seq)

    # -- facts -----------------------------------------------------------------------------------

    def _fact(self, name: str):
        if self._load_error is not None:
            raise DecoderError(str(self._load_error))
        if self.closed:
            raise DecoderError("the decoder is closed")
        return self._facts[name]

    n_vocab = property(lambda self: self._fact("n_vocab"))
    n_embd = property(lambda self: self._fact("n_embd"))
    n_ctx = property(lambda self: self._fact("n_ctx"))
    n_layer = property(lambda self: self._fact("n_layer"))
    n_threads = property(lambda self: self._fact("n_threads"))
    device = property(lambda self: self._fact("device"), doc="ggml's name of the device, e.g. CPU, CUDA0")
    kv_type = property(lambda self: self._fact("kv_type"))
    flash_attn = property(lambda self: self._fact("flash_attn"))
    cache_layout = property(lambda self: self._fact("cache_layout"),
                            doc="layers, K/V width, type, V layout: what a KVState must match")

    # -- lifetime --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._load_error is not None or (not self._loader.is_alive() and self._native.closed)

    def close(self) -> None:
        """Free the weights' mappings, device buffers and the cache; later calls raise. A load
        still running in the background is stopped first."""
        self._native.cancel_loading()
        if self._loader.is_alive():
            self._loader.join()
        self._load_error = None  # from now on every call says "closed", not why loading stopped
        self._native.close()

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
