"""The `Owl2` class: load a model folder, ask about images, stream answers, chat.

    from owl2_edge import Owl2
    owl = Owl2.load("owl2-7b-Q4_K_M")
    print(owl.ask("photo.jpg", "What is written on the sign?"))

One question flows (docs/design.md §1): images -> pixels (image) -> embeddings (vision, cached
by content); prompt -> template (prompt) -> ids with image slots (tokenizer) -> the KV cache's
missing runs (kv_prefix) -> decoder -> sampler (sampling) -> UTF-8-safe text pieces (detok).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from owl2_edge import checks, names, openai_chat
from owl2_edge.answer import Answer, check_finite
from owl2_edge.batch.engine import BatchResult, answer_all
from owl2_edge.chat import Chat
from owl2_edge.decoder import MAX_SEQUENCES, Decoder
from owl2_edge.errors import (ArgumentError, BusyError, ContextFullError, ModelFolderError,
                              PromptError)
from owl2_edge.image import content_hash, load_image, preprocess
from owl2_edge.kv_prefix import IMAGE, KVPrefix, prompt_items
from owl2_edge.load_options import LoadOptions
from owl2_edge.model_dir import MODEL_ENV, Manifest, default_model_path
from owl2_edge.prompt import Turn, check_image_count, render
from owl2_edge.sampling import SamplingParams
from owl2_edge.stats import Stats
from owl2_edge.tokenizer import Tokenizer
from owl2_edge.vision import VisionEncoder


# check_folder's context: the least a decoder is opened with (no question is asked).
CHECK_N_CTX = 16


class Owl2:
    def __init__(self, folder: Path, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                 vision: VisionEncoder, options: LoadOptions | None = None):
        self.folder, self.manifest = folder, manifest
        self.tokenizer, self.decoder, self.vision = tokenizer, decoder, vision
        if options is not None and not isinstance(options, LoadOptions):
            raise ArgumentError(f"options must be a LoadOptions, not {type(options).__name__}")
        self.options = options or LoadOptions()
        self.kv = KVPrefix(decoder, manifest.n_visual)
        self.stats = Stats()
        self.load_seconds = 0.0
        # One call at a time owns the decoder's KV cache and the vision cache: the turn number
        # and thread id of the owner, or None (docs/design.md §4.4).
        self._turn_change = threading.Condition()
        self._owner: tuple[int, int] | None = None
        self._turns = 0

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
        flash_attn, repack, aspect, exif_transpose: load_options.py gives each its default and
        meaning), or options=LoadOptions(...).

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
            vision = VisionEncoder.from_folder(folder, manifest, device=opts.vision_device,
                                               n_threads=decoder.n_threads)
            _check_files_agree(folder, manifest, tokenizer, decoder, vision)
            if wait:
                decoder.wait()
            on_error.pop_all()
        owl = cls(folder, manifest, tokenizer, decoder, vision, opts)
        owl.load_seconds = time.perf_counter() - t0
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
        with self._exclusive():
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
        with self._exclusive():
            return self._encode([image])[0][0]

    def logits(self, prompt: str, images: Sequence = (), continuation: Sequence[int] = ()
               ) -> np.ndarray:
        """float32 logits [T, n_vocab] for every position of a raw prompt's spliced sequence
        (T = text tokens + n_visual per image), evaluated from an empty cache. `continuation`:
        token ids appended after the prompt's (to score a given answer: teacher forcing)."""
        images = _as_list(images)
        ids = self.tokenize(prompt) + [self.tokenizer.check_id(t) for t in continuation]
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        with self._exclusive():
            embeds, keys = self._encode(images)
            items = prompt_items(ids, keys)
            self.kv.check_fits(items)
            self.kv.forget(0)
            logits = self.kv.evaluate(items, embeds, all_logits=True)
        check_finite(logits)
        return logits

    # -- asking ------------------------------------------------------------------------------------

    def stream(self, images, question: str, history: Sequence[tuple[str, str]] = (),
               raw: bool = False, **sampling) -> Iterator[str]:
        """Text pieces of the answer as they are decided. `images`: one or a list (paths, bytes,
        PIL images). `history`: earlier (question, answer) turns. raw=True takes `question` as the
        whole prompt (no template; <|image|> marks each image's place)."""
        images = _as_list(images)
        checks.text("question", question)
        checks.flag("raw", raw)
        if raw:
            prompt = question
        else:
            prompt = render([*(Turn(q, a) for q, a in history), Turn(question)], n_images=len(images))
        return self.generate(prompt, images, SamplingParams.of(sampling))

    def ask(self, images, question: str, **kwargs) -> str:
        """The whole answer as one string (upstream's CLI strips it)."""
        return "".join(self.stream(images, question, **kwargs)).strip()

    def batch(self, items: Iterable, parallel: int = 4, **sampling) -> Iterator[BatchResult]:
        """Answer many questions together: `items` are BatchItem(index, image, question),
        (image, question) pairs or {"image", "question"} dicts (image None: no image). Yields a
        BatchResult for each as it finishes, in no fixed order (`index` says which); a bad item
        gives a result with `error` set and the others go on. `parallel` answers are decoded
        together, each in its own sequence of the KV cache with n_ctx // parallel positions
        (load with n_ctx = parallel x what one answer needs). Answers are what ask() gives with
        that n_ctx (docs/design.md §14). Holds this object's caches until the iterator ends."""
        parallel = checks.integer("parallel", parallel, 1, MAX_SEQUENCES)
        params = SamplingParams.of(sampling)
        if self.decoder.n_ctx // parallel < 1:
            raise ArgumentError(f"n_ctx {self.decoder.n_ctx} is too small for {parallel} parallel "
                                "answers")
        return self._batch(items, parallel, params)

    def _batch(self, items, parallel: int, params: SamplingParams) -> Iterator[BatchResult]:
        turn = self._begin_turn()
        try:
            self.kv.forget(0)  # sequence 0 is one of the batch's now
            yield from answer_all(self, items, parallel, params, lambda: self._check_turn(turn))
        finally:
            self._end_turn(turn)

    def chat(self, images=()) -> Chat:
        """A conversation whose history is kept (and whose KV cache is reused turn to turn)."""
        return Chat(self.generate, _as_list(images))

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **sampling):
        """llama-cpp-python's / OpenAI's chat completion: messages with text and image_url parts
        (data: URLs, file:// URLs or local paths). A dict, or with stream=True an iterator of
        chunk dicts."""
        checks.flag("stream", stream)
        prompt, images = openai_chat.messages_to_prompt(messages)
        pieces = self.generate(prompt, images, SamplingParams.of(sampling))
        completion = openai_chat.Completion(model=self.folder.name)
        if stream:
            return completion.chunks(pieces, self.stats)
        return completion.response("".join(pieces).strip(), self.stats)

    def prepare(self, prompt: str, images: Sequence = ()) -> "Prepared":
        """A templated (or raw) prompt and its images, made ready for generate(): its length
        checked against the context, tokenized, its images decoded and preprocessed. Touches no
        cache, so it may run on any thread while another call answers (the server prepares a
        request on a worker thread while the model thread answers another). A prompt that
        cannot fit is refused from its length alone, before any of that (check_prompt_size)."""
        images = _as_list(images)
        self.check_prompt_size(prompt, len(images))
        ids = self.tokenize(prompt)
        if not ids:
            raise PromptError("the prompt is empty: there is nothing to answer")
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        self.kv.check_fits(prompt_items(ids, [""] * len(images)))  # before decoding any image
        pixels, keys = self._pixels(images)  # a bad image is refused now
        return Prepared(prompt_items(ids, keys), pixels)

    def check_prompt_size(self, prompt: str, n_images: int = 0) -> None:
        """ContextFullError when `prompt` is surely too long for the context, judged from its
        number of characters alone: no token spans more characters than the vocabulary's longest
        piece has bytes (Tokenizer.max_token_bytes), so a prompt with more characters than that
        many times the positions left once its images are placed needs more positions than
        there are. Cheap whatever the prompt's size, unlike tokenizing it (which also checks
        that the text is valid Unicode)."""
        if not isinstance(prompt, str):
            raise ArgumentError(f"prompt must be a str, not {type(prompt).__name__}")
        n_ctx, n_visual = self.decoder.n_ctx, self.manifest.n_visual
        left = n_ctx - n_images * n_visual
        if left < 1:
            raise ContextFullError(f"{n_images} image(s) take {n_images * n_visual} positions but "
                                   f"the context holds {n_ctx}; send fewer or load with a larger "
                                   f"n_ctx")
        chars = len(prompt) - prompt.count(names.IMAGE_PLACEHOLDER) * len(names.IMAGE_PLACEHOLDER)
        most = left * self.tokenizer.max_token_bytes
        if chars > most:
            raise ContextFullError(f"the prompt's {chars:,} characters cannot fit the context: "
                                   f"{left} position(s) left after its {n_images} image(s) hold "
                                   f"at most {most:,}; shorten it or load with a larger n_ctx")

    def max_prompt_chars(self, n_images: int = 0) -> int:
        """The longest prompt text (characters, image marks aside) that check_prompt_size lets
        through with `n_images` images."""
        left = self.decoder.n_ctx - n_images * self.manifest.n_visual
        return max(0, left) * self.tokenizer.max_token_bytes

    def generate(self, prompt: "str | Prepared", images: Sequence, params: SamplingParams
                 ) -> Iterator[str]:
        """The engine under stream(): a templated (or raw) prompt and its images (or what
        prepare() made of them, images then ()) -> text pieces. Prepares now; prefill and
        decoding run as the pieces are read, as the turn of this object that owns its caches
        until the last piece (or until the iterator is closed)."""
        if not isinstance(params, SamplingParams):
            raise ArgumentError(f"params must be a SamplingParams, not {type(params).__name__}")
        stats = Stats()
        t0 = time.perf_counter()
        if isinstance(prompt, Prepared):
            if _as_list(images):
                raise ArgumentError("a prepared prompt holds its images already: give images=()")
            prepared = prompt
        else:
            prepared = self.prepare(prompt, images)
        return self._answer(prepared.items, prepared.pixels, params, stats, t0)

    def _answer(self, items, pixels, params: SamplingParams, stats: Stats, t0: float
                ) -> Iterator[str]:
        turn = self._begin_turn()
        try:
            yield from self._prefill_and_decode(turn, items, pixels, params, stats, t0)
        finally:
            self._end_turn(turn)

    def _prefill_and_decode(self, turn, items, pixels, params, stats, t0) -> Iterator[str]:
        self.stats = stats
        embeds, head_start = self._encode_and_prefill_text(items, pixels, stats)
        # Prefill: only what the KV cache lacks of this prompt.
        t = time.perf_counter()
        logits, cached = self.kv.prefill(items, embeds)
        stats.reused_positions = cached - head_start  # what was there before this call
        stats.prompt_positions = sum(self.kv.width(i) for i in items)
        stats.evaluated_positions = stats.prompt_positions - stats.reused_positions
        t1 = time.perf_counter()
        stats.timings["prefill"] = stats.timings.get("prefill", 0.0) + t1 - t
        stats.timings["first_token"] = t1 - t0

        # Decode: sample, stream whole characters, feed the token back.
        answer = Answer(params, self.tokenizer,
                        [value for kind, value in items if kind != IMAGE],
                        stats.prompt_positions, self.decoder.n_ctx, stats)
        while True:
            piece = answer.step(logits)
            if piece:
                yield piece
                self._check_turn(turn)  # the reader may have made other calls meanwhile
            if answer.token is None:
                return
            logits = self.kv.append_token(answer.token)

    # -- turns: one call at a time owns the caches -------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[int]:
        turn = self._begin_turn()
        try:
            yield turn
        finally:
            self._end_turn(turn)

    def _begin_turn(self) -> int:
        """Wait while another thread's call owns the caches; in the same thread, take them over
        (an answer still being read there then raises BusyError at its next piece)."""
        me = threading.get_ident()
        with self._turn_change:
            while self._owner is not None and self._owner[1] != me:
                self._turn_change.wait()
            self._turns += 1
            self._owner = (self._turns, me)
            return self._turns

    def _end_turn(self, turn: int) -> None:
        with self._turn_change:
            if self._owner is not None and self._owner[0] == turn:
                self._owner = None
                self._turn_change.notify_all()

    def _check_turn(self, turn: int) -> None:
        owner = self._owner
        if owner is None or owner[0] != turn:
            raise BusyError("this answer was interrupted: a later call on the same Owl2 took over "
                            "its KV cache before it finished (read or close one answer before "
                            "starting the next)")

    def _pixels(self, images: Sequence) -> tuple[list[np.ndarray], list[str]]:
        pixels = [self.preprocess(image) for image in images]
        return pixels, [content_hash(p) for p in pixels]  # the vision cache's and KV items' keys

    def _encode(self, images: Sequence) -> tuple[list[np.ndarray], list[str]]:
        pixels, keys = self._pixels(images)
        return self._encode_pixels(pixels, keys, self.stats), keys

    def _encode_pixels(self, pixels: list[np.ndarray], keys: list[str], stats: Stats
                       ) -> list[np.ndarray]:
        t = time.perf_counter()
        before = self.vision.n_runs
        embeds = self.vision.encode_images(pixels, keys=keys)
        stats.images_encoded = self.vision.n_runs - before
        stats.timings["vision"] = time.perf_counter() - t
        return embeds

    def _encode_and_prefill_text(self, items, pixels, stats: Stats
                                 ) -> tuple[list[np.ndarray], int]:
        """The images' embeddings, and the positions prefilled meanwhile. While the vision
        model encodes them (on a thread: ONNX Runtime and the decoder both work without the GIL),
        the decoder waits for its weights if it must, then evaluates the prompt's text before the
        first image (docs/design.md §12)."""
        keys = [value for kind, value in items if kind == IMAGE]
        with ThreadPoolExecutor(1, thread_name_prefix="owl2-vision") as pool:
            encoding = pool.submit(self._encode_pixels, pixels, keys, stats) if pixels else None
            stats.timings["load_wait"] = self._wait_for_decoder()
            if encoding is None:
                return [], 0
            t = time.perf_counter()
            first_image = next(k for k, (kind, _) in enumerate(items) if kind == IMAGE)
            evaluated = self.kv.extend(items[:first_image])
            stats.timings["prefill"] = time.perf_counter() - t
            return encoding.result(), evaluated

    def _wait_for_decoder(self) -> float:
        """Seconds spent waiting for the decoder's weights (after a load with wait=False)."""
        if self.decoder.ready:
            return 0.0
        t = time.perf_counter()
        self.decoder.wait()
        return time.perf_counter() - t


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
    """A prompt made ready by Owl2.prepare: its KV items (token ids, and images by content key)
    and each image's preprocessed pixels, in order."""
    items: list
    pixels: list[np.ndarray]


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


__all__ = ["Owl2", "Chat", "Stats", "default_model_path"]
