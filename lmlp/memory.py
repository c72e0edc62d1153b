"""Reuse of freed memory by the C allocator, for the large temporaries of PyTorch on CPU.

PyTorch allocates every CPU tensor with ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB at start, raised as such blocks are freed) with fresh ``mmap``'d pages and returns free
memory at the top of the heap to the system above its trim threshold. A step that allocates and
frees the same megabyte-sized temporaries again and again then faults in and zeroes new pages for
each of them: for a 100-atom dense system with the SN2 model (radial terms of 56,000 pairs, a few
MiB each) that made the radial terms take 18 ms instead of 4, varying from call to call with the
allocator's state. ``keep_freed_memory`` sets both thresholds so that such blocks come from the
heap and stay there for the next step, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
would (PyTorch's performance guide suggests jemalloc or tcmalloc for the same reason). The price:
the process keeps its peak heap until it ends, instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""
MMAP_THRESHOLD = 32 << 20
"""Blocks under 32 MiB come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): the calculator's
float32 block temporaries (``lmlp.calculator.BLOCK_FLOATS``, 16 MiB) among them."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap is returned to the system only above 1 GiB."""


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (``MMAP_THRESHOLD``, ``TRIM_THRESHOLD``) for this process,
    once; whether they took effect (False where the C library has no ``mallopt``, e.g. macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
