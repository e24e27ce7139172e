"""Handing freed memory back to the operating system between the steps of the layer-wise loop.

glibc's malloc keeps the memory of freed blocks below its adaptive mmap threshold (up to 32 MB) in its heaps
for reuse, so after a step's transient arrays (a batch's patches, onnxruntime's outputs, the solver's copies)
are freed the resident set stays near their peak, and the next step's peak stacks on the fragments.
``FreedMemory.release`` asks malloc to return every free page (``malloc_trim(0)``, which also releases whole
free pages inside its heaps) once the resident set has grown by ``threshold_bytes`` since it last did: each
return costs the page faults of reusing that memory (ResNet-56: about 7 % of the solve when done after every
step), so a process whose steps stay small is left alone. Where the C library is not glibc it does nothing.

Between those returns, ``keep_freed_blocks`` has malloc keep freed blocks for reuse (docs/SCALE.md, Memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _glibc():
    """The C library when it is glibc on Linux (it has ``malloc_trim`` and ``mallopt``), else None."""
    if not hasattr(ctypes, "CDLL") or not os.path.exists("/proc/self/statm"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if libc.malloc_trim and libc.mallopt else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_FROM_BYTES = 32 << 20  # the ceiling of glibc's adaptive mmap threshold (64-bit)


@functools.cache
def keep_freed_blocks() -> None:
    """For this process from now on, malloc's thresholds where its adaptive rule would end: blocks under
    MMAP_FROM_BYTES come from its heaps, and free heap top up to twice that stays mapped for reuse. The adaptive
    rule starts at 128 KB and rises only as mapped blocks are freed, so until then (and, with several
    temporaries freed together, again and again) a step's temporaries are fresh mappings or returned heap
    top. ``FreedMemory.release`` still returns every free page."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_FROM_BYTES)


def resident_bytes() -> int:
    """This process's resident set (Linux's /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FreedMemory:
    def __init__(self, threshold_bytes: int):
        self.threshold_bytes = threshold_bytes
        self._after_last = resident_bytes() if _glibc() else 0

    def release(self) -> None:
        libc = _glibc()
        if libc is None or resident_bytes() - self._after_last < self.threshold_bytes:
            return
        libc.malloc_trim(0)
        self._after_last = resident_bytes()
