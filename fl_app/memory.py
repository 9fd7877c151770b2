"""Hand the heap memory a client message freed back to the operating system.

A simulation runs thousands of client messages in the same few worker processes (Ray
actors). With glibc's malloc, the mid-size arrays of a SCAFFOLD message (the model's
c, c_i, the correction and the float64 gradient sums: 190-380 KB each for the default
CNN) are served from the heap once glibc's dynamic mmap threshold has risen above
their size (it rises each time a larger mmapped chunk is freed; glibc ``mallopt(3)``,
M_MMAP_THRESHOLD), and the freed chunks stay with the process. Measured at 1,000
simulated nodes, 100 SCAFFOLD clients a round (experiments/benchmark_scale.py, PSS of
the workers' anonymous memory): +10 MiB a round without this, flat with
``malloc_trim(0)`` before each training message (which costs 0.2-10 ms). Elsewhere
(macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: return free heap pages to the OS. True if glibc did release
    something, False if there was nothing to release or no glibc."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
