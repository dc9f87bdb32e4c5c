"""Prompt text <-> token ids with llama.cpp's tokenizer, on the vocabulary of the base GGUF.

The base GGUF carries the release's sentencepiece vocabulary (tokenizer.ggml.*); llama.cpp's SPM
tokenizer on it gives the slow LlamaTokenizer's ids, as long as the prompt is cut the way
upstream's tokenizer_image_token cuts it (docs/architecture.md §7): see Tokenizer.tokenize.
Only the vocabulary is loaded (vocab_only), never the weights.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Sequence

import llama_cpp

from owl2_edge import _decoder, checks
from owl2_edge.checks import display_path
from owl2_edge.errors import DecoderError, ModelFolderError
from owl2_edge.llama_log import captured_llama_log, init_llama_backend
from owl2_edge.names import IMAGE_PLACEHOLDER, IMAGE_TOKEN_ID

class Tokenizer:
    """The vocabulary of a base GGUF. Use as a context manager or call close()."""

    def __init__(self, gguf_path: str | Path):
        path = Path(checks.path("gguf_path", gguf_path))
        if not path.is_file():
            raise ModelFolderError(f"{display_path(path)}: missing or not a regular file (the "
                                   f"decoder GGUF holds the vocabulary)")
        # llama.cpp's vocabulary loader aborts the whole process on some bad vocabularies
        # (duplicate tokens, no byte tokens, an empty list...): it only ever sees one that the
        # project's own reader has checked (cpp_ext/owl2_gguf_file.cpp, check_vocab).
        try:
            _decoder.check_vocab(os.fspath(path))
        except _decoder.NativeDecoderError as e:
            raise ModelFolderError(str(e)) from None
        init_llama_backend()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with captured_llama_log() as log:
            model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        if not model:
            why = log.first_error() or "llama.cpp could not load it"
            raise ModelFolderError(f"{path}: not a readable llama.cpp GGUF vocabulary ({why})")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.path = path
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.bos_id: int = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_id: int = llama_cpp.llama_vocab_eos(self._vocab)

    @property
    def vocab(self):
        """llama.cpp's vocabulary object (a llama_vocab pointer), for llguidance (constrain.py)."""
        return self._vocab

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
        self._model = None
        self._vocab = None

    def __enter__(self) -> "Tokenizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value of the base file, as text (None when the key is absent)."""
        if not self._model:
            raise DecoderError(f"{self.path}: the tokenizer is closed")
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _live_vocab(self):
        if not self._vocab:
            raise DecoderError(f"{self.path}: the tokenizer is closed")
        return self._vocab

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes any one token's piece renders to, special tokens' text ("</s>")
        included. A token covers at most that many characters of a prompt (a character, the "▁"
        that stands for a space included, renders to one byte or more), so a prompt of C
        characters needs at least C / max_token_bytes tokens: Owl2.check_prompt_size refuses one
        that cannot fit without tokenizing it."""
        return max(len(self.token_to_bytes(t, special=True)) for t in range(self.n_vocab))

    # -- text -> ids -----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        """Prompt -> ids, with IMAGE_TOKEN_ID where each IMAGE_PLACEHOLDER stood.

        Upstream tokenizes each chunk between placeholders ON ITS OWN (BOS + sentencepiece's
        dummy "▁" prefix each), keeps the first chunk's BOS only and joins chunks with one image
        id. So "USER: " before an image ends in a standalone "▁", and the text after an image
        starts with a "▁"-prefixed piece though the prompt has no space there. Tokenizing the
        prompt in one piece would give other ids, which the model was not trained on.
        Empty chunks give nothing (adjacent images -> two image ids). When the prompt starts with
        an image, upstream keeps every chunk's BOS ([IMAGE, BOS, ...]); that is reproduced too.
        """
        checks.text("prompt", prompt)
        chunks = [self._encode_with_bos(c) if c else [] for c in prompt.split(IMAGE_PLACEHOLDER)]
        # Upstream decides once, on the first chunk, whether BOS is hoisted and stripped.
        hoist_bos = bool(chunks[0])
        ids = [self.bos_id] if hoist_bos else []
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN_ID)
            ids.extend(chunk[1:] if hoist_bos else chunk)
        return ids

    def _encode_with_bos(self, text: str) -> list[int]:
        """One chunk as the slow LlamaTokenizer (legacy) encodes it: BOS, then the text with
        llama.cpp's space prefix. `</s>`, `<s>`, `<unk>` in the text are their special ids, and
        llama.cpp space-prefixes the text after each of them again, as legacy sentencepiece
        encoding of the split-off segment does."""
        vocab = self._live_vocab()
        data = text.encode("utf-8")
        # At most one token per byte, plus BOS, plus a prefix after each special token.
        capacity = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, capacity,
                                         True, True)  # add_special (BOS), parse_special
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    # -- ids -> text -----------------------------------------------------------------------------

    def check_id(self, token: int) -> int:
        # llama.cpp aborts the process on an id outside the vocabulary; refuse it here.
        if not (isinstance(token, int) or hasattr(token, "__index__")) \
                or not 0 <= int(token) < self.n_vocab:
            raise DecoderError(f"token id {token!r} is not in the vocabulary (0..{self.n_vocab - 1})")
        return int(token)

    def token_to_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes a token adds to the text ("▁" as a space, byte tokens as their byte).
        Control tokens (BOS, EOS) give b"" unless `special`."""
        vocab = self._live_vocab()
        token = self.check_id(token)
        size = 32
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        """Ids -> text as sentencepiece decodes it: control tokens (BOS, EOS) dropped unless
        `special`, and the space that the dummy prefix put before the first piece removed.
        Invalid UTF-8 (a byte token cut off) becomes U+FFFD."""
        vocab = self._live_vocab()
        ids = [self.check_id(t) for t in ids]
        if not special:
            # Leading control tokens render as nothing, but llama.cpp would count one as the first
            # piece and then keep the dummy-prefix space of the first real one.
            while ids and llama_cpp.llama_vocab_is_control(vocab, ids[0]):
                ids.pop(0)
        tokens = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        size = 16 + 8 * len(ids)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(vocab, tokens, len(ids), buf, size,
                                           False, special)  # remove_special, unparse_special
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
