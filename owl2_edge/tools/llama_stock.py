"""Stock llama.cpp (llama-cpp-python) as `owl2 bench` and the tests run it for comparison.

One exception to "stock as it comes": a llama-cpp-python built on a Xeon with AMX holds
quantized weights in ggml's AMX buffer type, whose matmul in this ggml crashes the process
(SIGSEGV) on weights whose rows are not a multiple of 2048 wide, the tiny test models' among
them (our decoder never uses that buffer type: cpp_ext/owl2_load.cpp, cpu_repack_bufts).
llama.cpp has no switch for that buffer type alone, so on such a build stock runs without
ggml's extra buffer types (use_extra_bufts = false): its weights used in place, not repacked.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import llama_cpp


@functools.lru_cache(maxsize=1)
def has_amx() -> bool:
    """Whether the installed ggml was built with AMX kernels (and this CPU has AMX)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def model_params():
    """llama.cpp's default model parameters, minus the AMX buffer type where it would be used."""
    return _without_amx(llama_cpp.llama_model_default_params())


def _without_amx(params):
    if has_amx():
        params.use_extra_bufts = False
    return params


@contextlib.contextmanager
def _default_params_patched() -> Iterator[None]:
    # llama_cpp.Llama builds its model parameters from the low-level module's
    # llama_model_default_params() inside its constructor and offers no argument for
    # use_extra_bufts.
    low_level = llama_cpp.llama_cpp
    original = low_level.llama_model_default_params
    low_level.llama_model_default_params = lambda: _without_amx(original())
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


def Llama(*args, **kwargs) -> llama_cpp.Llama:
    """llama_cpp.Llama(...) as stock runs here (see the module's docstring)."""
    if not has_amx():
        return llama_cpp.Llama(*args, **kwargs)
    with _default_params_patched():
        return llama_cpp.Llama(*args, **kwargs)
