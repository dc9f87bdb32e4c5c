"""Giving a large request's memory back to the system once it is answered or refused.

A request body of tens of MiB becomes a few copies of itself (the body, the parsed JSON, the
prompt) for a fraction of a second. Two things would keep that memory in the server for good:
the exception that refused the request sits in a reference cycle with the frames that held
those copies (freed only when Python's cycle collector next runs, which may be never on a quiet
server), and glibc keeps freed blocks below its mmap threshold in its heaps, and raises that
threshold to the size of the largest block freed so far (up to 32 MiB), so that once one large
body has been freed, the next ones land in the heaps too. So:

- at start, the mmap threshold is pinned (which also stops it rising): every block of 1 MiB or
  more is mapped on its own and unmapped when freed;
- after a request whose body was large, the cycle collector runs and glibc trims its heaps.

Neither matters for correctness; off glibc (macOS, musl) both are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# A body at least this large is followed by a collection and a trim (a few ms each).
LARGE_BODY_BYTES = 1 << 20
_MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def map_large_blocks() -> None:
    """Blocks of 1 MiB or more from their own mappings, for good (see the module's text)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def give_back() -> None:
    """Free what a large request left in reference cycles, and return free heap pages."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
