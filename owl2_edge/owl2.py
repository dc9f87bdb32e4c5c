"""The `Owl2` class: load a model folder, ask about images, stream answers, chat.

    from owl2_edge import Owl2
    owl = Owl2.load("owl2-7b-Q4_K_M")
    print(owl.ask("photo.jpg", "What is written on the sign?"))

One question flows (docs/design.md §1): prompt -> template (prompt) -> ids with image slots
(tokenizer) -> KV items (kv_prefix); images -> pixels (image); both -> a Job queued with the
engine (engine/), which encodes the pictures (vision), evaluates what no sequence of the cache
holds yet (decoder) and steps the answer loop (answer: sampling, stop rules, text) -> pieces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from owl2_edge import checks, clips, names, openai_chat, tool_calls
from owl2_edge.answer import check_finite
from owl2_edge.batch.engine import BatchResult, answer_all
from owl2_edge.chat import Chat
from owl2_edge.constrain import Constraint, ConstraintSpec
from owl2_edge.decoder import MAX_SEQUENCES, Decoder
from owl2_edge.disk_cache import DiskStore
from owl2_edge.engine import Engine, Job, Pieces
from owl2_edge.engine.disk_prefixes import DiskPrefixes, identities
from owl2_edge.engine.vision_worker import count_runs
from owl2_edge.errors import ArgumentError, ContextFullError, ModelFolderError, PromptError
from owl2_edge.grammar_worker import lark_of
from owl2_edge.image import content_hash, load_image, preprocess
from owl2_edge.kv_prefix import check_fits, positions, prompt_items, runs_of
from owl2_edge.load_options import LoadOptions
from owl2_edge.model_dir import MODEL_ENV, Manifest, default_model_path, note_unrecorded
from owl2_edge.prompt import Turn, before_question, check_image_count, render
from owl2_edge.sampling import SamplingParams, check_vocabulary
from owl2_edge.stats import Stats
from owl2_edge.tokenizer import Tokenizer
from owl2_edge.vision import VisionEncoder


# check_folder's context: the least a decoder is opened with (no question is asked).
CHECK_N_CTX = 16
# Compiled grammars kept per Owl2 (compiling a schema again costs about a millisecond).
CONSTRAINTS_KEPT = 32


class Owl2:
    def __init__(self, folder: Path, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                 vision: VisionEncoder, options: LoadOptions | None = None,
                 disk: DiskPrefixes | None = None):
        self.folder, self.manifest = folder, manifest
        self.tokenizer, self.decoder, self.vision = tokenizer, decoder, vision
        if options is not None and not isinstance(options, LoadOptions):
            raise ArgumentError(f"options must be a LoadOptions, not {type(options).__name__}")
        self.options = options or LoadOptions()
        # Every answer goes through the engine, whichever thread asks (docs/design.md §14).
        # What is kept on disk for later processes (options.cache; docs/cache.md), or None.
        self.disk = disk
        if disk is not None:
            vision.disk = disk
        self.engine = Engine(decoder, tokenizer, vision, manifest.n_visual, MAX_SEQUENCES,
                             disk=disk)
        self._last = threading.local()  # each thread's last answer's Stats (the stats property)
        self._constraints: dict[ConstraintSpec, Constraint] = {}  # compiled, least recent first
        self._constraints_lock = threading.Lock()
        self.load_seconds = 0.0

    @property
    def stats(self) -> Stats:
        """The counts and timings of the last answer this thread asked for (each thread sees its
        own: answers of other threads run meanwhile). A convenience after ask(); a stream's
        own are `pieces.stats` (another stream of the same thread replaces this)."""
        return getattr(self._last, "stats", None) or Stats()

    @stats.setter
    def stats(self, value: Stats) -> None:
        self._last.stats = value

    @property
    def parallel(self) -> int:
        """Answers decoded together at most (load option), each in `window` positions."""
        return self.options.parallel

    @property
    def window(self) -> int:
        """The positions one answer may hold (prompt and answer): n_ctx // parallel."""
        # The engine's copy of n_ctx, not the native decoder's fact: this is read on a server's
        # event loop, which must never wait for the decoder's call lock while it evaluates.
        return self.engine.n_ctx // self.options.parallel

    # The picture options of this object's loading, changeable later (checked as at load).
    @property
    def aspect(self) -> str:
        return self.options.aspect

    @aspect.setter
    def aspect(self, value: str) -> None:
        self.options = dataclasses.replace(self.options, aspect=value)

    @property
    def exif_transpose(self) -> bool:
        return self.options.exif_transpose

    @exif_transpose.setter
    def exif_transpose(self, value: bool) -> None:
        self.options = dataclasses.replace(self.options, exif_transpose=value)

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, wait: bool = True,
             **options) -> "Owl2":
        """A model folder (default: $OWL2_MODEL, then the demo model), loaded with `options`:
        LoadOptions' fields as keywords (n_ctx, n_threads, device, n_gpu_layers, kv_type,
        flash_attn, repack, aspect, exif_transpose, parallel, cache, cache_size:
        load_options.py gives each its default and meaning), or options=LoadOptions(...).
        cache=True (or a folder) keeps each picture's embeddings and KV prefix on disk, so that
        a later process asking about the same picture starts from them (docs/cache.md); off by
        default in the API, on by default in the CLI.

        The decoder's weights are read (and repacked or uploaded) on a thread while the
        tokenizer and the vision model load. wait=False returns before that thread is done: a
        first question then encodes its images meanwhile, and waits only when the decoder is
        needed (docs/design.md §12); a failure to place the weights (out of memory) is raised
        there. Every file and option is checked before load() returns either way."""
        # Every argument is checked, once, before anything loads.
        opts = LoadOptions.given(options.pop("options", None), options)
        checks.flag("wait", wait)
        folder = Path(checks.path("path", path)) if path is not None else default_model_path()
        if path is None and not folder.exists():
            raise ModelFolderError(f"no model given and {folder} does not exist: pass -m MODEL_DIR, "
                                   f"set ${MODEL_ENV}, or run `owl2 demo` once")
        t0 = time.perf_counter()
        manifest = Manifest.load(folder)
        with contextlib.ExitStack() as on_error:  # a failed load frees what it had opened
            tokenizer = Tokenizer(folder / manifest.decoder_file)
            on_error.callback(tokenizer.close)
            decoder = Decoder(folder / manifest.decoder_file, folder / manifest.mam_file, opts,
                              background=True)
            on_error.callback(decoder.close)
            # With the disk cache, a question whose pictures are all kept never opens the
            # vision model: on the CPU its session opens at the first picture it encodes.
            vision = VisionEncoder.from_folder(folder, manifest, device=opts.vision_device,
                                               n_threads=decoder.n_threads,
                                               lazy=opts.cache_dir is not None)
            _check_files_agree(folder, manifest, tokenizer, decoder, vision)
            disk = None
            if opts.cache_dir is not None:
                disk = DiskPrefixes(DiskStore(opts.cache_dir, opts.cache_size),
                                    *identities(folder, manifest, decoder, vision, opts),
                                    eos_id=tokenizer.eos_id)
            if wait:
                decoder.wait()
            on_error.pop_all()
        owl = cls(folder, manifest, tokenizer, decoder, vision, opts, disk)
        owl.load_seconds = time.perf_counter() - t0
        note_unrecorded(folder, manifest)  # (once it loads: a refusal is said alone, in one line)
        return owl

    @classmethod
    def check_folder(cls, path: str | os.PathLike) -> Manifest:
        """Check a model folder as load() does, and every vision variant it has besides the one
        load() opens; return its manifest. Any refusal is load()'s ModelFolderError or
        DecoderError. For commands that read a folder without answering (`owl2 quantize`,
        `owl2 info`): they refuse in the same line as `owl2 ask`, before another reader (gguf-py,
        llama.cpp's quantizer) sees a file. Loads at the least cost: the CPU, the GGUF files
        mapped in place (no repacking), the smallest context, then closes."""
        with cls.load(path, device="cpu", repack=False, n_ctx=CHECK_N_CTX, n_threads=1) as owl:
            for name in owl.manifest.vision_files.values():
                if owl.folder / name != owl.vision.path:
                    vision = VisionEncoder(owl.folder / name, "cpu", n_threads=1, cache_size=0)
                    _check_vision_agrees(owl.folder, owl.manifest, vision)
            return owl.manifest

    def close(self) -> None:
        """End every answer still running (they raise Owl2Error), free the model."""
        self.engine.close()
        if self.disk is not None:
            self.disk.close()  # what is queued for the disk is written first
        self.decoder.close()
        self.tokenizer.close()

    def __enter__(self) -> "Owl2":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the stages, each usable on its own --------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        """A raw prompt -> ids, with names.IMAGE_TOKEN_ID (-200) where each <|image|> stands."""
        return self.tokenizer.tokenize(prompt)

    def preprocess(self, image, aspect: str | None = None) -> np.ndarray:
        """An image (path, bytes, file or PIL image) -> float32 pixels [3, S, S]."""
        return preprocess(load_image(image, self.exif_transpose), self.manifest.image,
                          aspect or self.aspect)

    def encode_image(self, image) -> np.ndarray:
        """An image -> its float32 embeddings [n_visual, n_embd] (cached by content)."""
        return self._encode([image])[0][0]

    def logits(self, prompt: str, images: Sequence = (), continuation: Sequence[int] = ()
               ) -> np.ndarray:
        """float32 logits [T, n_vocab] for every position of a raw prompt's spliced sequence
        (T = text tokens + n_visual per image), evaluated from an empty cache. `continuation`:
        token ids appended after the prompt's (to score a given answer: teacher forcing)."""
        images = _as_list(images)
        ids = self.tokenize(prompt) + [self.tokenizer.check_id(t) for t in continuation]
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        embeds, keys = self._encode(images)
        items = prompt_items(ids, keys)
        check_fits(items, self.manifest.n_visual, self.engine.n_ctx, self.engine.n_ctx)
        with self.engine.exclusive():  # the whole cache, emptied: answers wait meanwhile
            try:
                logits = self.decoder.eval_runs(runs_of(items, embeds), all_logits=True)
            finally:
                self.decoder.clear_sequence(0)
        check_finite(logits)
        return logits

    # -- asking ------------------------------------------------------------------------------------

    def stream(self, images, question: str, history: Sequence[tuple[str, str]] = (),
               raw: bool = False, system: str | None = None, frames: int | None = None,
               start: float | None = None, end: float | None = None, **sampling) -> Pieces:
        """Text pieces of the answer as they are decided (an iterator; its `stats` are the
        answer's). `images`: one or a list (paths, bytes, PIL images), where a video or an
        animated picture (a path or bytes, or a clips.Clip) is a clip: `frames` of its frames
        (default clips.DEFAULT_FRAMES) evenly spaced over [start, end) seconds, one image slot
        each, in time order (docs/video.md). `history`: earlier (question, answer) turns.
        `system`: a text put first in the first question (instructions, or prompt.tools_text's
        offer of tools). raw=True takes `question` as the whole prompt (no template; <|image|>
        marks each image's place, a clip's one mark becoming one per frame)."""
        images = clips.sampled(_as_list(images), frames, start, end)
        checks.text("question", question)
        checks.flag("raw", raw)
        if raw:
            if system is not None:
                raise ArgumentError("system goes into the template: it cannot be given with raw=True")
            prompt = question
        else:
            prompt = render([*(Turn(q, a) for q, a in history), Turn(question)],
                            n_images=len(images), system=system)
        return self.generate(prompt, images, SamplingParams.of(sampling))

    def ask(self, images, question: str, **kwargs) -> str:
        """The whole answer as one string: stream()'s pieces joined."""
        return "".join(self.stream(images, question, **kwargs))

    def batch(self, items: Iterable, parallel: int = 4, **sampling) -> Iterator[BatchResult]:
        """Answer many questions together: `items` are BatchItem(index, image, question),
        (image, question) pairs or {"image", "question"} dicts (image None: no image). Yields a
        BatchResult for each as it finishes, in no fixed order (`index` says which); a bad item
        gives a result with `error` set and the others go on. Up to `parallel` of them are
        answered at once by the engine (beside any other caller's answers), each with
        n_ctx // parallel positions (load with n_ctx = parallel x what one answer needs).
        Answers are what ask() gives with that n_ctx (docs/design.md §14). Closing the iterator
        early cancels the items still being answered."""
        parallel = checks.integer("parallel", parallel, 1, MAX_SEQUENCES)
        params = SamplingParams.of(sampling)
        if self.decoder.n_ctx // parallel < 1:
            raise ArgumentError(f"n_ctx {self.decoder.n_ctx} is too small for {parallel} parallel "
                                "answers")
        return answer_all(self, items, parallel, params)

    def chat(self, images=(), warm: bool = True) -> Chat:
        """A conversation whose history is kept (and whose KV cache is reused turn to turn).
        Its pictures are read ahead (warm) as soon as they are given: at the start, and with
        each add_image (warm=False: when the question is sent)."""
        checks.flag("warm", warm)
        return Chat(self.generate, _as_list(images), warm=self.warm_prompt if warm else None)

    def warm(self, images, history: Sequence[tuple[str, str]] = (), system: str | None = None
             ) -> Job:
        """Read ahead what a question about `images` (after `history`, with `system`) will
        start with: the pictures encoded and that part of the prompt prefilled, in steps no
        answer uses (docs/api.md, "Warming"). Returns at once. The question asked later (ask,
        stream, chat, or a server request: the same prompt) then evaluates only its own words;
        asked before warming is done, it takes over what is done. The Job: cancel() drops it,
        `finished` says it is done. Costs: one vision run per new picture, and the cells, kept
        until the room is needed (least recently used first)."""
        images = _as_list(images)
        prefix = before_question([*(Turn(q, a) for q, a in history), Turn("")],
                                 n_images=len(images), system=system)
        return self.warm_prompt(prefix, images)

    def warm_prompt(self, prefix: str, images: Sequence = ()) -> Job:
        """warm() for a templated prompt's beginning (prompt.before_question) and its images."""
        return self.submit_warm(self.prepare(prefix, images))

    def submit_warm(self, prepared: "Prepared") -> Job:
        """warm() for what prepare() made of a prompt's beginning (a server reads its images
        under its own limits first)."""
        held = positions(prepared.items, self.manifest.n_visual)
        # Its window is what it holds (and the one token a window must have room for): the
        # answer that takes its cells over brings its own.
        job = Job(prepared.items, prepared.pixels, SamplingParams(), window=held + 1,
                  positions=held)
        job.disk_prefix = prepared.disk_prefix
        job.prefill_only = job.low_priority = True
        return self.engine.submit(job)

    def create_chat_completion(self, messages: list[dict], stream: bool = False, tools=None,
                               tool_choice=None, **sampling):
        """llama-cpp-python's / OpenAI's chat completion: messages with text and image_url parts
        (data: URLs, file:// URLs or local paths), OpenAI's tools and tool_choice
        (tool_calls.py: a call comes back as message.tool_calls). A dict, or with stream=True
        an iterator of chunk dicts."""
        checks.flag("stream", stream)
        params = SamplingParams.of(sampling)
        functions, callable_, params = tool_calls.offer(tools, tool_choice, params)
        may_call = callable_[1] if callable_ else None
        prompt, images = openai_chat.messages_to_prompt(messages, functions=functions)
        pieces = self.generate(prompt, images, params)
        completion = openai_chat.Completion(model=self.folder.name)
        token_bytes = self.tokenizer.token_to_bytes if params.logprobs else None
        if stream:
            return completion.chunks(pieces, pieces.stats, token_bytes, may_call)
        text = "".join(pieces)
        logprobs = (openai_chat.chat_logprobs(pieces.stats.logprobs, token_bytes)
                    if token_bytes else None)
        call = tool_calls.parse_call(text, may_call) if may_call else None
        return completion.response(text, pieces.stats, logprobs=logprobs, call=call)

    def prepare(self, prompt: str, images: Sequence = (), window: int | None = None
                ) -> "Prepared":
        """A templated (or raw) prompt and its images, made ready for generate() or submit():
        its length checked against an answer's window, tokenized, its images decoded and
        preprocessed. Touches no cache: any thread may run it at any time (the server prepares a
        request on a worker thread while the engine answers others). A prompt that cannot fit is
        refused from its length alone, before any of that (check_prompt_size). window: the
        positions the answer will have, when not self.window (Owl2.batch's share)."""
        prompt, images, clip_frames = clips.expand(prompt, _as_list(images))
        window = self._window(window)
        if clip_frames and len(images) * self.manifest.n_visual >= window:
            raise ContextFullError(
                f"{len(images)} images, {clip_frames} of them a clip's frames, take "
                f"{len(images) * self.manifest.n_visual:,} positions but an answer may hold "
                f"{window:,}: ask for fewer frames (frames=, --frames) or load with a larger n_ctx")
        self.check_prompt_size(prompt, len(images), window)
        ids = self.tokenize(prompt)
        if not ids:
            raise PromptError("the prompt is empty: there is nothing to answer")
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        check_fits(prompt_items(ids, [""] * len(images)), self.manifest.n_visual, window,
                   self.engine.n_ctx)  # before any image is read
        pixels, keys = self._pixels(images)  # a bad image is refused now
        items = prompt_items(ids, keys)
        return Prepared(items, pixels, self.engine.find_on_disk(items))

    def _window(self, window: int | None) -> int:
        if window is None:
            return self.window
        return checks.integer("window", window, 1, self.engine.n_ctx)

    def check_prompt_size(self, prompt: str, n_images: int = 0, window: int | None = None
                          ) -> None:
        """ContextFullError when `prompt` is surely too long for an answer's window, judged from
        its number of characters alone: no token spans more characters than the vocabulary's
        longest piece has bytes (Tokenizer.max_token_bytes), so a prompt with more characters
        than that many times the positions left once its images are placed needs more positions
        than there are. Cheap whatever the prompt's size, unlike tokenizing it (which also
        checks that the text is valid Unicode)."""
        if not isinstance(prompt, str):
            raise ArgumentError(f"prompt must be a str, not {type(prompt).__name__}")
        window, n_visual = self._window(window), self.manifest.n_visual
        left = window - n_images * n_visual
        if left < 1:
            raise ContextFullError(f"{n_images} image(s) take {n_images * n_visual} positions but "
                                   f"an answer may hold {window}; send fewer or load with a "
                                   f"larger n_ctx")
        chars = len(prompt) - prompt.count(names.IMAGE_PLACEHOLDER) * len(names.IMAGE_PLACEHOLDER)
        most = left * self.tokenizer.max_token_bytes
        if chars > most:
            raise ContextFullError(f"the prompt's {chars:,} characters cannot fit the context: "
                                   f"{left} position(s) left after its {n_images} image(s) hold "
                                   f"at most {most:,}; shorten it or load with a larger n_ctx")

    def max_prompt_chars(self, n_images: int = 0) -> int:
        """The longest prompt text (characters, image marks aside) that check_prompt_size lets
        through with `n_images` images."""
        left = self.window - n_images * self.manifest.n_visual
        return max(0, left) * self.tokenizer.max_token_bytes

    def generate(self, prompt: "str | Prepared", images: Sequence, params: SamplingParams,
                 trim: bool = True) -> Pieces:
        """The engine under stream(): a templated (or raw) prompt and its images (or what
        prepare() made of them, images then ()) -> the answer's text pieces. Prepares now; the
        answer is queued for the engine when the first piece is asked for, and cancelled when
        the iterator is closed (or dropped) before its end. trim=False keeps the text's end
        whitespace (a raw completion's)."""
        t0 = time.perf_counter()
        if isinstance(prompt, Prepared):
            if _as_list(images):
                raise ArgumentError("a prepared prompt holds its images already: give images=()")
            prepared = prompt
        else:
            prepared = self.prepare(prompt, images)
        return Pieces(self._job(prepared, params, None, t0, trim), self.engine.submit)

    def submit(self, prepared: "Prepared", params: SamplingParams, window: int | None = None,
               started: float | None = None, trim: bool = True,
               constraint: Constraint | None = None) -> Job:
        """Queue an answer for the engine and return at once: the Job gives its text pieces
        (next(), poll() with set_waker(), iteration), its Stats, and cancel(). Safe from any
        thread; answers are decoded together, first come first served, `parallel` at a time
        (docs/api.md, threading). window: the positions it may hold (default: self.window).
        constraint: params' grammar as constraint() compiled it (else it is compiled here, on
        the calling thread)."""
        return self.engine.submit(self._job(prepared, params, window, started, trim, constraint))

    def _job(self, prepared: "Prepared", params: SamplingParams, window: int | None,
             started: float | None, trim: bool, constraint: Constraint | None = None) -> Job:
        """The Job of an answer, checked whole before anything is queued."""
        if not isinstance(prepared, Prepared):
            raise ArgumentError(f"submit takes what prepare() returns, not "
                                f"{type(prepared).__name__}")
        if not isinstance(params, SamplingParams):
            raise ArgumentError(f"params must be a SamplingParams, not {type(params).__name__}")
        checks.flag("trim", trim)
        window = self._window(window)
        job = Job(prepared.items, prepared.pixels, params, window,
                  positions(prepared.items, self.manifest.n_visual), started, trim)
        check_vocabulary(params, self.tokenizer.n_vocab)
        job.disk_prefix = prepared.disk_prefix
        if params.constraint is not None:  # refused here, before anything is generated
            if constraint is None or constraint.spec != params.constraint:
                constraint = self.constraint(params.constraint)
            job.constraint = constraint
        self.stats = job.stats
        return job

    def constraint(self, spec: ConstraintSpec, to_lark=lark_of) -> Constraint:
        """The compiled grammar of a spec (GrammarError when it cannot be, within
        constraint_bounds.BOUNDS); the last few are kept (a server's clients send the same
        schema again and again). Up to about a second for a large grammar: a server calls it
        on a worker thread, with its child process's GBNF converter as `to_lark`
        (Constraint.compile)."""
        with self._constraints_lock:
            constraint = self._constraints.pop(spec, None)
        if constraint is None:
            constraint = Constraint.compile(spec, self.tokenizer, to_lark)
        with self._constraints_lock:
            self._constraints[spec] = constraint
            while len(self._constraints) > CONSTRAINTS_KEPT:
                self._constraints.pop(next(iter(self._constraints)))
        return constraint

    def _pixels(self, images: Sequence) -> tuple[list[np.ndarray], list[str]]:
        pixels = [self.preprocess(image) for image in images]
        return pixels, [content_hash(p) for p in pixels]  # the vision cache's and KV items' keys

    def _encode(self, images: Sequence) -> tuple[list[np.ndarray], list[str]]:
        """Images -> embeddings, through the engine's vision worker (the one caller of the
        vision model)."""
        pixels, keys = self._pixels(images)
        t = time.perf_counter()
        futures = self.engine.vision.encode(pixels, keys) if pixels else []
        encoded = [future.result() for future, _ in futures]
        stats = Stats(images_encoded=count_runs(encoded))
        stats.timings["vision"] = time.perf_counter() - t
        self.stats = stats
        return [e.embeds for e in encoded], keys


def _check_files_agree(folder: Path, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                       vision: VisionEncoder) -> None:
    """The manifest repeats facts that the GGUF and ONNX files carry themselves; a folder whose
    files were swapped or edited would otherwise fail later, or answer wrongly."""
    if manifest.template != names.TEMPLATE_ID:
        raise ModelFolderError(f"{folder / names.MANIFEST_FILE}: template {manifest.template!r} is not "
                               f"one this owl2-edge knows ({names.TEMPLATE_ID!r})")
    d = manifest.decoder
    _check_vision_agrees(folder, manifest, vision)
    _check_facts(folder, [
        ("pair_id", manifest.pair_id, tokenizer.metadata(names.KEY_PAIR_ID),
         folder / manifest.decoder_file),
        ("decoder.n_embd", d.n_embd, decoder.n_embd, folder / manifest.decoder_file),
        ("decoder.n_vocab", d.n_vocab, decoder.n_vocab, folder / manifest.decoder_file),
        ("decoder.n_layer", d.n_layer, decoder.n_layer, folder / manifest.decoder_file),
        ("decoder.n_vocab", d.n_vocab, tokenizer.n_vocab, folder / manifest.decoder_file),
        ("decoder.bos_id", d.bos_id, tokenizer.bos_id, folder / manifest.decoder_file),
        ("decoder.eos_id", d.eos_id, tokenizer.eos_id, folder / manifest.decoder_file),
    ])


def _check_vision_agrees(folder: Path, manifest: Manifest, vision: VisionEncoder) -> None:
    _check_facts(folder, [
        ("n_visual", manifest.n_visual, vision.n_visual, vision.path),
        ("image.size", manifest.image.size, vision.image_size, vision.path),
        ("decoder.n_embd", manifest.decoder.n_embd, vision.n_embd, vision.path),
    ])


def _check_facts(folder: Path, facts: list) -> None:
    """facts: (manifest field, what the manifest says, what a file has or None, the file)."""
    for field, said, found, path in facts:
        if found is not None and found != said:
            raise ModelFolderError(f"{folder / names.MANIFEST_FILE}: {field} is {said} but {path.name} "
                                   f"has {found} (files from different models?)")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A prompt made ready by Owl2.prepare: its KV items (token ids, and images by content key),
    each image's preprocessed pixels, in order, and the longest prefix of its items that the
    disk cache keeps: (item count, KVState) or None."""
    items: list
    pixels: list[np.ndarray]
    disk_prefix: tuple | None = None


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


__all__ = ["Owl2", "Chat", "Stats", "default_model_path"]
