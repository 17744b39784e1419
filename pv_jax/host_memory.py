"""Host (CPU) memory housekeeping."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's, through the process's own symbols
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``); whether it ran.

    Reading weights tensor by tensor and compiling leave freed host memory that glibc keeps
    for reuse: at SDXL size 0.6 GiB after the load alone, and the next phase's peak sits on top
    of it (docs/BENCHMARKS.md, the SDXL sampler's memory). Without glibc: nothing.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
