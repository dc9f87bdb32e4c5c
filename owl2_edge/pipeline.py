"""The `Owl2` class: load a model folder, ask about images, stream answers, chat.

    from owl2_edge import Owl2
    owl = Owl2.load("owl2-7b-Q4_K_M")
    print(owl.ask("photo.jpg", "What is written on the sign?"))

One question flows: images -> pixels (image.py) -> embeddings (vision.py, cached by content) ;
prompt -> template (prompt.py) -> ids with image slots (tokenizer.py) -> runs of one modality ->
decoder (decoder.py, KV cache reused across questions) -> sampler -> UTF-8-safe text pieces.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from owl2_edge import names
from owl2_edge.decoder import Decoder
from owl2_edge.detok import Utf8Stream
from owl2_edge.errors import ContextFullError, ImageError, ModelFolderError
from owl2_edge.image import ASPECT_MODES, content_hash, load_image, preprocess
from owl2_edge.model_dir import MODEL_ENV, Manifest, default_model_path
from owl2_edge.prompt import PromptError, Turn, check_image_count, render
from owl2_edge.sampling import Sampler, SamplingParams
from owl2_edge.tokenizer import Tokenizer
from owl2_edge.vision import VisionEncoder

@dataclass
class Stats:
    """What the last generation did: counts (exact) and timings (seconds)."""
    prompt_positions: int = 0      # spliced positions of the prompt (images count n_visual each)
    reused_positions: int = 0      # of those, already in the KV cache
    evaluated_positions: int = 0   # prompt positions the decoder actually ran
    generated_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # the generated ids, eos excluded
    images_encoded: int = 0        # vision model runs it took (0: every image came from the cache)
    finish_reason: str = ""        # "stop" (eos), "length" (max_tokens) or "context" (cache full)
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# One position-run of the sequence in the KV cache, to find what a new prompt can reuse: a text
# token, or a whole image (by content hash; it spans n_visual positions).
_Item = tuple[str, object]


class Owl2:
    def __init__(self, folder: Path, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                 vision: VisionEncoder, aspect: str = "pad", exif_transpose: bool = True):
        self.folder, self.manifest = folder, manifest
        self.tokenizer, self.decoder, self.vision = tokenizer, decoder, vision
        if aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {', '.join(ASPECT_MODES)}, not {aspect!r}")
        self.aspect, self.exif_transpose = aspect, exif_transpose
        self._cached: list[_Item] = []   # what the decoder's KV cache holds, in order
        self.stats = Stats()

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto", n_ctx: int = 2048,
             n_threads: int | None = None, kv_type: str = "f16", flash_attn: bool = False,
             n_gpu_layers: int = -1, repack: bool = True, aspect: str = "pad",
             exif_transpose: bool = True) -> "Owl2":
        folder = Path(path) if path is not None else default_model_path()
        if path is None and not folder.exists():
            raise ModelFolderError(f"no model given and {folder} does not exist: pass -m MODEL_DIR, "
                                   f"set ${MODEL_ENV}, or run `owl2 demo` once")
        t0 = time.perf_counter()
        manifest = Manifest.load(folder)
        tokenizer = Tokenizer(folder / manifest.decoder_file)
        decoder = Decoder(folder / manifest.decoder_file, folder / manifest.mam_file, n_ctx=n_ctx,
                          n_threads=n_threads, device=device, n_gpu_layers=n_gpu_layers,
                          kv_type=kv_type, flash_attn=flash_attn, repack=repack)
        # The decoder is where a GPU matters; the vision model takes ONNX Runtime's CUDA provider
        # when onnxruntime-gpu can start it and runs on the CPU otherwise (owl.vision.provider).
        providers = "cpu" if device == "cpu" else "auto"
        vision = VisionEncoder.from_folder(folder, manifest, providers=providers, n_threads=n_threads)
        owl = cls(folder, manifest, tokenizer, decoder, vision, aspect, exif_transpose)
        owl.load_seconds = time.perf_counter() - t0
        return owl

    def close(self) -> None:
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

    def logits(self, prompt: str, images: Sequence = ()) -> np.ndarray:
        """float32 logits [T, n_vocab] for every position of a raw prompt's spliced sequence
        (T = text tokens + n_visual per image), evaluated from an empty cache."""
        ids = self.tokenize(prompt)
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        embeds, hashes = self._encode(images)
        self._check_fits(ids, 0)
        self._forget(0)
        return np.concatenate(self._evaluate(self._items(ids, hashes), embeds, 0, all_logits=True))

    # -- asking ------------------------------------------------------------------------------------

    def stream(self, images, question: str, history: Sequence[tuple[str, str]] = (),
               raw: bool = False, **sampling) -> Iterator[str]:
        """Text pieces of the answer as they are decided. `images`: one or a list (paths, bytes,
        PIL images). `history`: earlier (question, answer) turns. raw=True takes `question` as the
        whole prompt (no template; <|image|> marks each image's place)."""
        images = _as_list(images)
        if raw:
            prompt = question
        else:
            prompt = render([*(Turn(q, a) for q, a in history), Turn(question)], n_images=len(images))
        return self.generate(prompt, images, SamplingParams(**sampling))

    def ask(self, images, question: str, **kwargs) -> str:
        """The whole answer as one string (upstream's CLI strips it)."""
        return "".join(self.stream(images, question, **kwargs)).strip()

    def chat(self, images=()) -> "Chat":
        """A conversation whose history is kept (and whose KV cache is reused turn to turn)."""
        return Chat(self, _as_list(images))

    def generate(self, prompt: str, images: Sequence, params: SamplingParams) -> Iterator[str]:
        """The engine under stream(): a templated (or raw) prompt and its images -> text pieces."""
        stats = self.stats = Stats()
        t0 = time.perf_counter()
        ids = self.tokenize(prompt)
        check_image_count(ids.count(names.IMAGE_TOKEN_ID), len(images))
        embeds, hashes = self._encode(images)
        stats.timings["vision"] = time.perf_counter() - t0
        return self._decode(ids, embeds, hashes, params, stats)

    def _decode(self, ids, embeds, hashes, params, stats) -> Iterator[str]:
        t0 = time.perf_counter()
        logits = self._prefill(ids, embeds, hashes, stats)
        t1 = time.perf_counter()
        stats.timings["prefill"] = t1 - t0
        sampler = Sampler(params)
        text_ids = [t for t in ids if t != names.IMAGE_TOKEN_ID]
        out = Utf8Stream(self.tokenizer.token_to_bytes)
        started = False
        stats.finish_reason = "length"
        eos = self.tokenizer.eos_id
        for _ in range(params.max_tokens):
            if params.ignore_eos:
                logits = logits.copy()
                logits[eos] = -np.inf
            token = sampler(logits, text_ids)
            if token == eos:
                stats.finish_reason = "stop"
                break
            stats.generated_tokens += 1
            stats.tokens.append(token)
            text_ids.append(token)
            piece = out.push(token)
            if not started:
                # The first piece carries sentencepiece's word-start space; upstream strips it.
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
            if self.decoder.n_past >= self.decoder.n_ctx:
                stats.finish_reason = "context"
                break
            logits = self.decoder.eval_tokens([token])
            self._cached.append(("t", token))
        tail = out.flush()
        if tail:
            yield tail
        stats.timings["decode"] = time.perf_counter() - t1

    # -- the KV cache ------------------------------------------------------------------------------

    def _prefill(self, ids, embeds, hashes, stats: Stats) -> np.ndarray:
        """Evaluate what the cache lacks of this prompt; return the last position's logits."""
        items = self._items(ids, hashes)
        stats.prompt_positions = sum(self._width(i) for i in items)
        self._check_fits(ids, 0)
        keep = 0
        while keep < min(len(items), len(self._cached)) and items[keep] == self._cached[keep]:
            keep += 1
        if keep == len(items) and keep:
            keep -= 1  # the last position must run again: its logits start the answer
        self._forget(keep)
        stats.reused_positions = self.decoder.n_past
        first_image = sum(1 for kind, _ in items[:keep] if kind == "i")
        logits = self._evaluate(items[keep:], embeds, first_image)[-1]
        stats.evaluated_positions = stats.prompt_positions - stats.reused_positions
        return logits

    def _evaluate(self, items: list[_Item], embeds, first_image: int,
                  all_logits: bool = False) -> list[np.ndarray]:
        """Append items to the decoder's cache run by run (each run one modality) and return each
        run's logits. A run is recorded in _cached only once the decoder holds it, so an
        interruption (Ctrl-C, an error) leaves the two in agreement."""
        out, image_index = [], first_image
        while items:
            if items[0][0] == "i":
                run, items = items[:1], items[1:]
                out.append(self.decoder.eval_embeddings(embeds[image_index], all_logits=all_logits))
                image_index += 1
            else:
                n = next((k for k, item in enumerate(items) if item[0] == "i"), len(items))
                run, items = items[:n], items[n:]
                out.append(self.decoder.eval_tokens([value for _, value in run], all_logits=all_logits))
            self._cached.extend(run)
        return out

    def _forget(self, keep_items: int) -> None:
        keep_positions = sum(self._width(i) for i in self._cached[:keep_items])
        self.decoder.rewind(self.decoder.n_past - keep_positions)
        self._cached = self._cached[:keep_items]

    def _items(self, ids, hashes) -> list[_Item]:
        items, k = [], 0
        for t in ids:
            if t == names.IMAGE_TOKEN_ID:
                items.append(("i", hashes[k]))
                k += 1
            else:
                items.append(("t", t))
        return items

    def _width(self, item: _Item) -> int:
        return self.manifest.n_visual if item[0] == "i" else 1

    def _check_fits(self, ids, generated: int) -> None:
        n_images = ids.count(names.IMAGE_TOKEN_ID)
        positions = len(ids) - n_images + n_images * self.manifest.n_visual + generated
        if positions > self.decoder.n_ctx:
            raise ContextFullError(
                f"the prompt needs {positions} positions ({len(ids) - n_images} tokens + "
                f"{n_images} image(s) x {self.manifest.n_visual}) but the context holds "
                f"{self.decoder.n_ctx}; shorten it or load with a larger n_ctx")

    def _encode(self, images: Sequence) -> tuple[list[np.ndarray], list[str]]:
        pixels = [self.preprocess(image) for image in images]
        keys = [content_hash(p) for p in pixels]  # the vision cache's keys and the KV items' too
        before = self.vision.n_runs
        embeds = self.vision.encode_images(pixels, keys=keys)
        self.stats.images_encoded = self.vision.n_runs - before
        return embeds, keys

    # -- OpenAI-style chat completion ------------------------------------------------------------

    def create_chat_completion(self, messages: list[dict], stream: bool = False, **sampling):
        """llama-cpp-python's / OpenAI's chat completion: messages with text and image_url parts
        (data: URLs, file:// URLs or local paths). mPLUG-Owl2 has no system prompt: a system
        message's text is put before the first user message."""
        prompt, images = _messages_to_prompt(messages)
        params = SamplingParams(**sampling)
        pieces = self.generate(prompt, images, params)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model = self.folder.name
        if stream:
            return self._completion_chunks(pieces, cid, created, model)
        text = "".join(pieces).strip()
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if self.stats.finish_reason == "stop" else "length"}],
            "usage": self._usage(),
        }

    def _completion_chunks(self, pieces, cid, created, model) -> Iterator[dict]:
        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield chunk({"role": "assistant"})
        for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, "stop" if self.stats.finish_reason == "stop" else "length")

    def _usage(self) -> dict:
        s = self.stats
        return {"prompt_tokens": s.prompt_positions, "completion_tokens": s.generated_tokens,
                "total_tokens": s.prompt_positions + s.generated_tokens}


class Chat:
    """A conversation: each send() adds a turn; images added with add_image() are placed in the
    next question. The prompt of turn n starts with turn n-1's, so the KV cache is reused."""

    def __init__(self, owl: Owl2, images: list):
        self.owl = owl
        self.turns: list[Turn] = []
        self.images: list = []
        self._new_images: list = list(images)

    def add_image(self, image) -> None:
        load_image(image)  # fail now, with the file's name, rather than at the next question
        self._new_images.append(image)

    def clear(self) -> None:
        self.turns, self.images, self._new_images = [], [], []

    def send(self, question: str, **sampling) -> Iterator[str]:
        marks = names.IMAGE_PLACEHOLDER * len(self._new_images)
        if question.count(names.IMAGE_PLACEHOLDER):
            raise PromptError(f"in a chat, add images with add_image (/image), not {names.IMAGE_PLACEHOLDER}")
        turn = Turn(marks + question)
        images = self.images + self._new_images
        prompt = render([*self.turns, turn], n_images=len(images))
        pieces = self.owl.generate(prompt, images, SamplingParams(**sampling))
        answer: list[str] = []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:
            # An interrupted answer (Ctrl-C, the caller stopped reading) stays in the history as
            # far as it got, as in a chat window.
            self.turns.append(Turn(turn.user, "".join(answer).strip()))
            self.images, self._new_images = images, []


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _messages_to_prompt(messages: list[dict]) -> tuple[str, list]:
    system, turns, images = [], [], []
    pending_user: list[str] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        text = _content_text(content, images)
        if role == "system":
            system.append(text)
        elif role == "user":
            pending_user.append(text)
        elif role == "assistant":
            if not pending_user:
                raise PromptError("an assistant message must follow a user message")
            turns.append(Turn(" ".join(pending_user), text))
            pending_user = []
        else:
            raise PromptError(f"unknown message role {role!r}")
    if not pending_user:
        raise PromptError("the last message must be the user's")
    turns.append(Turn(" ".join(pending_user)))
    if system:
        first = turns[0]
        turns[0] = Turn(" ".join(system) + " " + first.user, first.assistant)
    return render(turns, n_images=len(images)), images


def _content_text(content, images: list) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PromptError("message content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(part.get("text", ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(_image_from_url(url))
            parts.append(names.IMAGE_PLACEHOLDER)
        else:
            raise PromptError(f"unknown content part type {kind!r}")
    return "".join(parts)


def _image_from_url(url) -> bytes | str:
    if not isinstance(url, str) or not url:
        raise ImageError("image_url needs a url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ImageError("only base64 data: URLs are supported")
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise ImageError("image_url: the data: URL is not valid base64") from None
    if url.startswith("file://"):
        return url[len("file://"):]
    if "://" in url:
        raise ImageError(f"{url}: only local files and data: URLs are read (owl2-edge never downloads)")
    return url


__all__ = ["Owl2", "Chat", "Stats", "default_model_path"]
