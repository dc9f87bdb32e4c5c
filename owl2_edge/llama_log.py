"""llama.cpp through llama-cpp-python, made quiet: its backend started once, and its log captured
during a call so that a failure becomes one line (its first error) and a success prints nothing.

The tokenizer (a vocab-only load of the base GGUF) and the converter (llama.cpp's quantizer)
both call into llama.cpp this way.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

import llama_cpp

# ggml_log_level (ggml.h): 4 = error, 5 = continuation of the previous message.
_LOG_ERROR, _LOG_CONT = 4, 5


class LlamaLog:
    """The lines llama.cpp logged during one captured call, as (level, text)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def first_error(self) -> str | None:
        """The first error line: the cause (later ones only say that loading failed)."""
        for level, text in self.lines:
            if level != _LOG_ERROR:
                continue
            # One message may span lines, some of them rules of "=" (the quantizer's banners).
            for line in text.splitlines():
                if line.strip().strip("=-").strip():
                    return line.strip()
        return None


@contextlib.contextmanager
def captured_llama_log() -> Iterator[LlamaLog]:
    """Collect llama.cpp's log lines during the block instead of printing them; restore
    llama-cpp-python's own log callback afterwards."""
    log = LlamaLog()
    last_level = [0]

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        if level == _LOG_CONT:
            level = last_level[0]
        last_level[0] = level
        log.lines.append((level, (text or b"").decode("utf-8", errors="replace")))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield log
    finally:
        from llama_cpp import _logger
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


_backend_ready = False


def init_llama_backend() -> None:
    """llama_backend_init, once per process."""
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
