"""What every benchmark script measures the same way: peak and current memory, a median wall
time, a timed compile and XLA's FLOP count (``pv_jax.train.metrics.compiled_flops``, the one the
trainer's MFU uses). Scripts run as ``python bench/NAME.py``, so they import this as ``common``."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "compile_timed",
    "compiled_flops",
    "current_rss_gib",
    "median_time",
    "peak_rss_gib",
    "wall_times",
]


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled program: the trainer's count (``pv_jax.train.metrics``), imported
    late so that a script can set XLA's flags before anything imports JAX."""
    from pv_jax.train import metrics

    return metrics.compiled_flops(compiled)


def _status_gib(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return None


def peak_rss_gib() -> float:
    """Peak resident memory of this process image so far (GiB).

    /proc's VmHWM where there is one: ``ru_maxrss`` would carry a parent's peak across exec.
    """
    peak = _status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Start a new peak: VmHWM := VmRSS (Linux), so the next :func:`peak_rss_gib` is a phase's."""
    Path("/proc/self/clear_refs").write_text("5")


def current_rss_gib() -> float:
    """Resident memory of this process now (GiB)."""
    now = _status_gib("VmRSS")
    if now is None:
        raise RuntimeError("no VmRSS in /proc/self/status (current memory needs Linux)")
    return now


def _ready(out: Any) -> Any:
    """Wait for JAX arrays in ``out`` (other values, torch's or numpy's, are ready already)."""
    import jax

    return jax.block_until_ready(out)


def wall_times(repeats: int, fn: Callable, *args) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn(*args)``, each waiting for its JAX arrays."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def median_time(repeats: int, fn: Callable, *args) -> float:
    """Median wall time of ``repeats`` calls of ``fn(*args)`` (see :func:`wall_times`)."""
    return statistics.median(wall_times(repeats, fn, *args))


def compile_timed(jitted: Callable, *args, **kwargs) -> tuple[Any, float, float]:
    """Lower and compile ``jitted`` for ``args`` ahead of time: (compiled, lower_s, compile_s)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1
