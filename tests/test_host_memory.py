"""pv_jax.host_memory: freed host memory that glibc keeps goes back to the OS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pv_jax.host_memory import release_freed_memory


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status: VmRSS is Linux's")


def test_freed_heap_goes_back_to_the_os():
    """Buffers below glibc's mmap threshold (100 KB) freed between small ones that stay (8 KB,
    past numpy's own small-block cache): glibc keeps the holes until malloc_trim hands them
    back."""
    kept, freed = [], []
    for _ in range(4000):
        freed.append(np.ones(12_500))  # 100 KB each, about 380 MiB in all
        kept.append(np.ones(1_000))
    del freed
    held = _rss_mib()
    assert release_freed_memory()
    assert held - _rss_mib() > 150, "the freed buffers were not handed back"
    assert len(kept) == 4000
