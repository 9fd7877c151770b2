"""fl_app/memory.py: freed heap memory goes back to the OS (glibc)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

from fl_app.memory import _malloc_trim, release_freed_memory

GLIBC = _malloc_trim() is not None


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_freed_mid_size_arrays_are_returned_to_the_os():
    """What a worker saw: once glibc's dynamic mmap threshold has risen (a large mmapped
    chunk freed), ~200 KB arrays come from the heap; freed, they stay resident until
    trimmed (one live array at the top stops glibc's automatic trim)."""
    script = textwrap.dedent("""
        import numpy as np
        from fl_app.memory import release_freed_memory

        def rss_mib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

        big = np.ones(4 << 20); del big           # raises the mmap threshold to ~32 MiB
        arrays = [np.ones(25_000) for _ in range(1000)]   # 200 KB each, 200 MB in the heap
        top = arrays[-1]
        del arrays                                # all but the top one freed
        before = rss_mib()
        released = release_freed_memory()
        after = rss_mib()
        print(released, before, after)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    released, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert released
    assert before - after > 150, (before, after)  # the 200 MB of freed arrays, give or take


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    _malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        _malloc_trim.cache_clear()
