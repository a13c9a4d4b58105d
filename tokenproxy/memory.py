"""The C allocator, tuned for a process that moves large bodies in 256 KiB reads.

Every read from a socket is a fresh bytes object of up to 256 KiB. glibc serves one that size
with mmap until the first is freed, then from the heap, and after each free gives the heap's
top back to the kernel (its trim threshold is twice the last such size): so every chunk was a
heap grow and a trim, and 64 fresh zeroed pages to fault in. A download from a freshly started
daemon ran at half nginx's rate, every time (benchmarks/run.py, "first down"). Serving
body-sized blocks from the heap and keeping a few MiB free at its top makes the same memory
serve the next chunk. The cost is at most those few MiB of RSS.
"""

from __future__ import annotations

import ctypes
from typing import Final

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 4 * 1024 * 1024   # well above a read (256 KiB) and a write buffer
TRIM_THRESHOLD: Final = 8 * 1024 * 1024   # free memory kept at the heap's top


def tune_allocator() -> bool:
    """Set the thresholds above; False where the C library has no mallopt (not glibc).

    Process-wide, so called by the command line, not by the library: an application that
    embeds tokenproxy keeps its own allocator settings.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
