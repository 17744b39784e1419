"""Training metrics: JSON lines and TensorBoard summaries (written by process 0 only)."""

from __future__ import annotations

import io
import json
import os
import time

import jax

from pv_jax.paths import is_remote, run_path

# Peak dense bf16 FLOP/s per device, for model FLOP utilisation. The CPU figure is this
# project's measured sgemm peak of a 2-core machine (fp32); override with train.peak_tflops.
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
    "cpu": 0.19,
}


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled computation by XLA's cost analysis (0 when it reports none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def step_flops(compiled, grad_accum: int = 1) -> float:
    """FLOPs of one train step. XLA's cost analysis counts a loop's body once, so a step of
    ``grad_accum`` microbatches (a scan) is counted as K times its count; the part outside the
    scan (draws, the optimizer update) is then counted K times too, under 0.1% of a step at
    the sizes where MFU matters (0.03% on the tiny config, measured)."""
    return compiled_flops(compiled) * grad_accum


def peak_tflops(device: jax.Device, override: float = 0.0) -> float:
    """Peak TFLOP/s of one device (by device kind), or ``override`` when set."""
    if override:
        return override
    kind = device.device_kind
    for name, value in PEAK_TFLOPS.items():
        if kind.startswith(name) or (name == "cpu" and device.platform == "cpu"):
            return value
    return 0.0


class MetricWriter:
    """Appends ``{"step": n, ...}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    On local disk each line is appended and flushed at once. A bucket object cannot be appended
    to, so there the lines are kept and ``metrics.jsonl`` is rewritten whole (one atomic upload)
    at most every ``flush_every_s`` seconds, on :meth:`flush` (the trainer calls it before each
    checkpoint, so no step before a checkpoint is lost) and on :meth:`close`.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, tensorboard: bool = True, flush_every_s: float = 30.0
    ):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.workdir = run_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / "metrics.jsonl"
        self.remote = is_remote(self.workdir)
        self.flush_every_s = flush_every_s
        if self.remote:
            self.lines = self.path.read_text().splitlines(True) if self.path.exists() else []
            self.unflushed = 0
            self.last_flush = time.monotonic()
        else:
            self.jsonl = self.path.open("a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.fspath(self.workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Record scalars for ``step``."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **scalars}) + "\n"
        if self.remote:
            self.lines.append(line)
            self.unflushed += 1
            if time.monotonic() - self.last_flush >= self.flush_every_s:
                self.flush()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Make every line written so far durable (uploads ``metrics.jsonl`` in a bucket)."""
        if not self.enabled:
            return
        if self.remote and self.unflushed:
            self.path.write_text("".join(self.lines))
            self.unflushed = 0
        if self.remote:
            self.last_flush = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def write_image(self, step: int, name: str, image) -> None:
        """Save an (H, W, 3) uint8 image as ``<name>/step_<step>.png`` and to TensorBoard."""
        if not self.enabled:
            return
        from PIL import Image

        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        (folder / f"step_{step:07d}.png").write_bytes(png.getvalue())
        if self.tb is not None:
            self.tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the files."""
        if not self.enabled:
            return
        self.flush()
        if not self.remote:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(source: str | os.PathLike, *, by_step: bool = False) -> list[dict]:
    """The rows of a metrics file: ``source`` is a run folder (its ``metrics.jsonl``, local or
    in a bucket) or a ``.jsonl`` file; FileNotFoundError when there is none.

    File order by default: a resumed run appends, so a step it repeats appears once per
    attempt. ``by_step``: one row per step, the last attempt's, in step order.
    """
    path = run_path(source)
    if path.suffix != ".jsonl":
        path = path / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if by_step:
        last = {row["step"]: row for row in rows}
        rows = [last[step] for step in sorted(last)]
    return rows
