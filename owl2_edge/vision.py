"""The vision ONNX under ONNX Runtime: preprocessed pixels -> the image embeddings the decoder
splices in, with an LRU cache of embeddings keyed by the pixels' content hash.

    encoder = VisionEncoder.from_folder(model_dir)          # picks the file and the provider
    embeds = encoder.encode_images([preprocess(img, spec)])  # list of [n_visual, n_embd]

Providers are chosen explicitly and the active one is read back (`.provider`): onnxruntime-gpu
quietly runs on the CPU when its CUDA provider cannot start, and a user who asked for a GPU must
hear that.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from owl2_edge import checks
from owl2_edge.errors import ArgumentError, ModelFolderError, Owl2Error
from owl2_edge.image import content_hash
from owl2_edge.model_dir import Manifest
from owl2_edge.names import DEVICES, ONNX_INPUT, ONNX_OUTPUT
from owl2_edge.onnx_weights import check_external_data

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Which vision file a provider prefers when a folder has several (names.VISION_VARIANTS).
# CPU, measured (benchmarks/bench_vision.py: the 7B-shaped graph at 448 px, 2 AVX2 cores, 2
# threads; seconds an image, cosine to fp32's embeddings with random / trained weights): int8 is
# the fastest (3.8 s against fp32's 5.8 s; 0.9956 / 0.99987); fp32 is exact; fp16 is no faster
# (6.0 s) and holds as much memory (ONNX Runtime's CPU provider widens its weights to float32 at
# load) but is not exact (0.999998); int4 is no faster either (6.1 s: MatMulNBits unpacks to
# float32 here) and the least exact (0.904 / 0.998), for a fifth of fp32's memory.
_CPU_VARIANTS = ("int8", "fp32", "fp16", "int4")
# CUDA, reasoned (no GPU measured): fp16 weights and math run natively on tensor cores; then
# fp32. int4's MatMulNBits has CUDA kernels, but in float32; int8's dynamic quantization
# (DynamicQuantizeLinear, DynamicQuantizeMatMul) has CPU kernels only, so ONNX Runtime would run
# those nodes on the CPU and copy every activation across.
_CUDA_VARIANTS = ("fp16", "fp32", "int4", "int8")


class VisionEncoder:
    """One ONNX Runtime session over a vision ONNX ([N,3,S,S] float32 -> [N,n_visual,n_embd]).

    device: "cpu"; "cuda" (CUDA or an Owl2Error, never a silent CPU run); "auto" (CUDA when
    onnxruntime-gpu has it and a CUDA driver is installed and it starts, else CPU).
    from_folder() also picks the file that suits the provider; the constructor runs the file
    it is given.
    n_threads: ONNX Runtime's intra-op threads (None: its default, one per physical core).
    cache_size: embeddings kept by encode_images (0: no cache).
    max_batch: images per ONNX run in encode_images (bounds activation memory).
    expect: (image size, n_visual, n_embd) that the file must have: on the CPU, the session is
        then opened at the first run, not here (a process whose pictures all come from the disk
        cache never opens it: docs/cache.md), and the file is checked against them there.
    """

    def __init__(self, onnx_path: str | Path, device: str = "auto", n_threads: int | None = None,
                 cache_size: int = 16, max_batch: int = 4,
                 expect: tuple[int, int, int] | None = None):
        device = checks.choice("device", device, DEVICES)
        n_threads = checks.threads("n_threads", n_threads)
        cache_size = checks.integer("cache_size", cache_size, 0, 1 << 16)
        max_batch = checks.integer("max_batch", max_batch, 1, 1024)
        self.path = Path(checks.path("onnx_path", onnx_path))
        if not self.path.is_file():
            raise ModelFolderError(f"{self.path}: missing vision model")
        check_external_data(self.path)
        if device == "cuda" and CUDA not in ort.get_available_providers():
            raise Owl2Error("CUDA was asked for but this ONNX Runtime has no CUDA provider "
                            "(install onnxruntime-gpu), or choose the CPU")
        self.device, self.n_threads, self.expect = device, n_threads, expect
        self.cache_size, self.max_batch = cache_size, max_batch
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.n_runs = 0  # ONNX runs so far: lets a caller (and the tests) see cache hits
        # A second tier below the memory cache, kept across processes: an object with
        # embeds(key) -> array | None and put_embeds(key, array) (engine/disk_prefixes.py).
        self.disk = None
        self._session: ort.InferenceSession | None = None
        self._opening = threading.Lock()
        if expect is not None and self._providers() == [CPU]:
            self.provider = CPU
            self.image_size, self.n_visual, self.n_embd = expect
        else:
            self._open()

    def _providers(self) -> list[str]:
        cuda = self.device == "cuda" or (self.device == "auto" and cuda_possible())
        return [CUDA, CPU] if cuda else [CPU]

    @property
    def opened(self) -> bool:
        """Whether the ONNX Runtime session exists (see `expect`)."""
        return self._session is not None

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            with self._opening:
                if self._session is None:
                    self._open()
        return self._session

    def _open(self) -> None:
        """Create the session and read what it runs on and its interface."""
        device, n_threads = self.device, self.n_threads
        options = ort.SessionOptions()
        # Errors come back as exceptions (one line, below); ONNX Runtime's own log would add
        # lines to a terminal's stderr around them.
        options.log_severity_level = 4
        if n_threads is not None:
            options.intra_op_num_threads = n_threads
        wanted = self._providers()
        try:
            # onnxruntime's Python wrapper print()s its provider fallbacks ("EP Error ...") to
            # stdout, where they would mix with an answer: the error below says it in one line.
            # Only this thread's prints are dropped: the session may open on the vision
            # worker's thread while the main thread writes (a chat's ">>> " prompt).
            with _this_thread_quiet():
                session = ort.InferenceSession(str(self.path), options, providers=wanted)
        except Exception as e:  # ONNX Runtime's error types derive from Exception directly
            raise ModelFolderError(f"{self.path}: not a usable ONNX model "
                                   f"({_one_line(e)})") from None
        # What ONNX Runtime actually runs on: the first provider it kept.
        provider = session.get_providers()[0]
        if device == "cuda" and provider != CUDA:
            raise Owl2Error("CUDA was asked for but ONNX Runtime could not start its CUDA "
                            "provider (no GPU, or CUDA/cuDNN libraries missing); choose the CPU")
        found = _interface(session, self.path)
        if self.expect is not None and found != tuple(self.expect):
            raise ModelFolderError(
                f"{self.path}: the vision model takes {found[0]} px and gives [{found[1]}, "
                f"{found[2]}] but the manifest says {self.expect[0]} px and "
                f"[{self.expect[1]}, {self.expect[2]}] (files from different models?)")
        self.provider = provider
        self.image_size, self.n_visual, self.n_embd = found
        self._session = session

    @classmethod
    def from_folder(cls, folder: str | Path, manifest: Manifest | None = None,
                    device: str = "auto", lazy: bool = False, **kwargs) -> "VisionEncoder":
        """The model folder's vision model on the provider asked for.

        CUDA runs the fp16 file when the folder has it. "auto" uses CUDA only with the fp16
        file, and when CUDA does not start after all it reopens the CPU's preferred file on
        the CPU (where int8 runs faster and fp32 more exactly). lazy: on the CPU, open the
        session at the first run (`expect`: the manifest's facts, checked then)."""
        folder = Path(folder)
        manifest = manifest or Manifest.load(folder)
        if lazy:
            kwargs["expect"] = (manifest.image.size, manifest.n_visual, manifest.decoder.n_embd)
        files = manifest.vision_files
        if device == "auto" and (not cuda_possible() or "fp16" not in files):
            device = "cpu"
        variant = _pick_variant(files, _CUDA_VARIANTS if device != "cpu" else _CPU_VARIANTS)
        encoder = cls(folder / files[variant], device, **kwargs)
        if encoder.provider == CPU and _pick_variant(files, _CPU_VARIANTS) != variant:
            encoder = cls(folder / files[_pick_variant(files, _CPU_VARIANTS)], "cpu", **kwargs)
        return encoder

    # -- running ---------------------------------------------------------------------------------

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """pixels [N, 3, S, S] (preprocess() output, stacked) -> float32 [N, n_visual, n_embd],
        all N in one ONNX run. No cache."""
        pixels = self._checked(pixels)
        if len(pixels) == 0:
            return np.zeros((0, self.n_visual, self.n_embd), dtype=np.float32)
        self.n_runs += 1
        try:
            out = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels})[0]
        except Exception as e:  # a graph that loads but cannot run (a damaged or foreign file)
            raise ModelFolderError(f"{self.path}: the vision model failed to run "
                                   f"({_one_line(e)})") from None
        expected = (len(pixels), self.n_visual, self.n_embd)
        if out.shape != expected or out.dtype != np.float32:
            raise ModelFolderError(f"{self.path}: the vision model gave {out.dtype} "
                                   f"{list(out.shape)}, not float32 {list(expected)}")
        if not np.isfinite(out).all():
            raise ModelFolderError(f"{self.path}: the vision model gave NaN or infinite "
                                   f"embeddings (a damaged weight?)")
        return out

    def encode_images(self, images: list[np.ndarray], keys: list[str] | None = None) -> list[np.ndarray]:
        """Each image's pixels [3, S, S] -> its embeddings [n_visual, n_embd], read-only.

        The cache lives here, keyed by content_hash of the pixels: the key then covers the
        picture, the aspect mode and the normalisation at once, so a picture asked about again
        (a new question, the next chat turn) is not encoded twice. Images not in the cache are
        encoded together, max_batch per run; an image repeated within the call runs once.
        `keys`: content_hash of each image when the caller has them already (not hashed twice)."""
        for i, image in enumerate(images):
            if np.ndim(image) != 3:
                raise ArgumentError(f"image {i}: pixels of shape {list(np.shape(image))}; expected one "
                                 f"image [3, {self.image_size}, {self.image_size}]")
        if keys is None:
            keys = [content_hash(np.asarray(image)) for image in images]
        elif len(keys) != len(images):
            raise ArgumentError(f"{len(keys)} keys for {len(images)} images")
        found = {}
        for key in keys:
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
            elif self.disk is not None and key not in found:
                embeds = self.disk.embeds(key)
                if embeds is not None and embeds.shape == (self.n_visual, self.n_embd):
                    found[key] = embeds
                    self._remember(key, embeds)
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in found and key not in first_index:
                first_index[key] = i
        todo = list(first_index.items())
        for start in range(0, len(todo), self.max_batch):
            chunk = todo[start:start + self.max_batch]
            out = self.encode(np.stack([np.asarray(images[i]) for _, i in chunk]))
            for (key, _), embeds in zip(chunk, out):
                embeds = embeds.copy()  # its own memory, so eviction frees it
                embeds.setflags(write=False)
                found[key] = embeds
                self._remember(key, embeds)
                if self.disk is not None:
                    self.disk.put_embeds(key, embeds)
        return [found[k] for k in keys]

    def _remember(self, key: str, embeds: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = embeds
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _checked(self, pixels) -> np.ndarray:
        pixels = np.asarray(pixels)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ArgumentError(f"pixels of shape {list(pixels.shape)} do not fit this vision model: "
                             f"expected [N, 3, {s}, {s}] (owl2_edge.image.preprocess gives "
                             f"[3, {s}, {s}] per image)")
        if not np.issubdtype(pixels.dtype, np.floating):
            raise ArgumentError(f"pixels are {pixels.dtype}; expected normalised float32 "
                             f"(owl2_edge.image.preprocess), not raw levels")
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def __repr__(self) -> str:
        return (f"VisionEncoder({self.path.name}, provider={self.provider}, "
                f"image_size={self.image_size}, n_visual={self.n_visual}, n_embd={self.n_embd})")


@functools.cache
def cuda_possible() -> bool:
    """Whether trying ONNX Runtime's CUDA provider can succeed at all: onnxruntime-gpu lists it
    even on a machine without a GPU, and trying it there prints a page of load errors. The CUDA
    driver library is present exactly where an NVIDIA driver is installed."""
    if CUDA not in ort.get_available_providers():
        return False
    driver_names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in driver_names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _pick_variant(files: dict[str, str], preference: tuple[str, ...]) -> str:
    for variant in preference:
        if variant in files:
            return variant
    return next(iter(files))


def _interface(session: ort.InferenceSession, path: Path) -> tuple[int, int, int]:
    """(S, n_visual, n_embd) read from the graph, which must be the vision ONNX's interface."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    by_name = {o.name: o for o in outputs}
    ok = [i.name for i in inputs] == [ONNX_INPUT] and ONNX_OUTPUT in by_name
    if ok:
        in_shape, out_shape = inputs[0].shape, by_name[ONNX_OUTPUT].shape
        ok = (inputs[0].type == "tensor(float)" and by_name[ONNX_OUTPUT].type == "tensor(float)"
              and len(in_shape) == 4 and len(out_shape) == 3
              and all(isinstance(d, int) for d in [*in_shape[1:], *out_shape[1:]])
              and in_shape[1] == 3 and in_shape[2] == in_shape[3])
    if not ok:
        found = ", ".join(f"{x.name} {x.type} {x.shape}" for x in [*inputs, *outputs])
        raise ModelFolderError(f"{path}: not an owl2-edge vision model (expected {ONNX_INPUT} "
                               f"float [N,3,S,S] -> {ONNX_OUTPUT} float [N,n_visual,n_embd]; "
                               f"found {found})")
    return in_shape[2], out_shape[1], out_shape[2]


class _QuietFor:
    """sys.stdout that drops what one thread writes and passes every other thread's on."""

    def __init__(self, stream, thread: int):
        self._stream, self._thread = stream, thread

    def write(self, text: str) -> int:
        if threading.get_ident() == self._thread:
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, fileno, encoding, isatty...: the real stream's
        return getattr(self._stream, name)


_QUIETING = threading.Lock()  # one swap of sys.stdout at a time, undone in the order made


@contextlib.contextmanager
def _this_thread_quiet():
    """contextlib.redirect_stdout for the calling thread only (it swaps sys.stdout for every
    thread: another thread's print in the meantime would be lost)."""
    with _QUIETING:
        real = sys.stdout
        quiet = _QuietFor(real, threading.get_ident())
        sys.stdout = quiet
        try:
            yield
        finally:
            if sys.stdout is quiet:
                sys.stdout = real


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
