"""Checks of the arguments callers pass, each failing with ArgumentError (an Owl2Error that is also
a ValueError) whose message names the argument, what it must be and what it was.

Every entry point of the API checks its arguments here before they reach numpy, nanobind or the
C++ decoder, whose own errors (TypeError from an overflowing int, "Probabilities contain NaN"...)
would say nothing a caller can act on.
"""

from __future__ import annotations

import math
import operator
import os

from owl2_edge.errors import ArgumentError


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def display_path(path) -> str:
    """A file name fit for a one-line message: control characters escaped, long names elided."""
    name = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(path))
    return name if len(name) <= 160 else f"{name[:100]}...{name[-50:]}"


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (or numpy integer; never a bool, a float or a string) within [lo, hi]."""
    if isinstance(value, bool):
        raise ArgumentError(f"{name} must be an integer, not {_shown(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name} must be an integer, not {_shown(value)}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                  else f">= {lo}" if lo is not None else f"<= {hi}")
        raise ArgumentError(f"{name} must be {bounds}, not {value}")
    return value


def number(name: str, value, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (int or float, never a bool or a string) within its bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ArgumentError(f"{name} must be a number, not {_shown(value)}")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ArgumentError(f"{name} must be a number, not {_shown(value)}") from None
    if not math.isfinite(value):
        raise ArgumentError(f"{name} must be a finite number, not {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        raise ArgumentError(f"{name} must be {span}, not {value:g}")
    return value


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {', '.join(choices)}, not {_shown(value)}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be True or False, not {_shown(value)}")
    return value


def text(name: str, value) -> str:
    """A str that can be encoded as UTF-8 (no lone surrogates, as from a broken decode)."""
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ArgumentError(f"{name} is not valid Unicode: a lone surrogate "
                            f"U+{ord(value[e.start]):04X} at character {e.start}") from None
    return value


def path(name: str, value) -> str:
    """A file-system path (str or os.PathLike) as a str the OS can take."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(f"{name} must be a path, not {type(value).__name__}")
    value = os.fspath(value)
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a text path, not bytes")
    text(name, value)
    if "\0" in value:
        raise ArgumentError(f"{name} holds a NUL character")
    return value


def threads(name: str, value) -> int | None:
    """None (the default count) or 1 .. the native side's limit (ggml's GGML_MAX_N_THREADS, and
    4 per hardware thread: more only thrash the cores, thousands would exhaust the process)."""
    if value is None:
        return None
    from owl2_edge import _decoder
    return integer(name, value, 1, _decoder.max_n_threads())
