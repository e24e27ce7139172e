"""Handing freed memory back to the operating system between the steps of the layer-wise loop.

glibc's malloc keeps the memory of freed blocks below its adaptive mmap threshold (up to 32 MB) in its heaps
for reuse, so after a step's transient arrays (a batch's patches, onnxruntime's outputs, the solver's copies)
are freed the resident set stays near their peak, and the next step's peak stacks on the fragments.
``release_freed_memory`` asks malloc to return every free page (``malloc_trim(0)``, which also releases whole
free pages inside its heaps). Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    if not hasattr(ctypes, "CDLL"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
