"""Benchmark: one PhotoVerse train step (forward + backward + AdamW) on this machine.

    python bench/train_step.py                           # the matrix below, one process each
    python bench/train_step.py --config sd15 --resolution 256 --batch 1 --face 1 --remat 1
    python bench/train_step.py --config sd15 --resolution 512 --steps 0   # FLOPs only

Each setting runs in its own process (so that peak RSS is its own) on random networks of the
preset (``tiny``, or ``sd15``: SD1.5 UNet/VAE/text + CLIP ViT-L/14 vision, 1.37B parameters),
synthetic batches, fp32 on the CPU. Prints one JSON object per setting with ``config,
resolution, batch, face_loss, remat, step_s, examples_per_s, gflops_per_s, peak_rss_gib``,
plus compile and build times and the step's XLA FLOP count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = [
    ("tiny", 32, 1, 1, 0),
    ("tiny", 32, 2, 1, 0),
    ("tiny", 32, 2, 0, 0),
    ("tiny", 32, 2, 1, 1),
    ("sd15", 256, 1, 1, 1),
    ("sd15", 256, 1, 0, 1),
    ("sd15", 256, 1, 1, 0),
    ("sd15", 256, 2, 1, 1),
]


def run_one(
    config: str,
    resolution: int,
    batch: int,
    face: bool,
    remat: bool,
    steps: int,
    face_window: float = 1.0,
    face_fraction: float | None = None,
):
    """Build, compile and time the step; returns the JSON record."""
    import jax

    sys.path.insert(0, str(ROOT))
    from configs import tiny
    from pv_jax.train import sharding, trainer
    from pv_jax.train.metrics import compiled_flops

    cfg = tiny.get_config()
    if config == "sd15":
        from pv_jax.photoverse import PhotoVerseConfig

        cfg.model = PhotoVerseConfig().to_dict()
        cfg.base.kind = "random_sd15"
    cfg.data.resolution = resolution
    cfg.train.batch_size = batch
    cfg.base.remat = bool(remat)
    if not face:
        cfg.model.face_weight = 0.0
    cfg.model.face_window = face_window
    cfg.model.face_batch_fraction = face_fraction
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(1, 1)
    run = trainer.setup(cfg, mesh)
    build_s = time.perf_counter() - t0
    state = sharding.put_global(run.host_state, run.state_sh)
    run.host_state = None
    batch_arrays = sharding.put_batch(next(run.data), mesh)
    t0 = time.perf_counter()
    compiled = run.step.lower(state, run.frozen, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    record = {
        "config": config,
        "resolution": resolution,
        "batch": batch,
        "face_loss": bool(face),
        "remat": bool(remat),
        "face_window": face_window,
        "face_fraction": face_fraction,
        "step_gflop": round(flops / 1e9, 2),
        "compile_s": round(compile_s, 2),
    }
    if steps == 0:  # compile only: the FLOP count of a setting too slow to run here
        return record
    times = []
    for _ in range(steps + 1):  # the first call also allocates: not timed
        t0 = time.perf_counter()
        state, metrics = compiled(state, run.frozen, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    return {
        **record,
        "step_s": round(step_s, 4),
        "examples_per_s": round(batch / step_s, 3),
        "gflops_per_s": round(flops / step_s / 1e9, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "build_s": round(build_s, 2),
        "trainable_params": run.trainable_params,
        "params": run.trainable_params + run.frozen_params,
        "loss": float(metrics["loss"]),
        "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    """Run one setting (flags given) or the whole matrix (each in a subprocess)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=["tiny", "sd15"])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--face", type=int, default=1)
    p.add_argument("--remat", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps; 0: compile only")
    p.add_argument("--face-window", type=float, default=1.0, help="1.0: whole-image decode")
    p.add_argument(
        "--face-fraction", type=float, default=None, help="face sub-batch (default: P(t<=500))"
    )
    p.add_argument("--only", choices=["tiny", "sd15"], help="run the matrix rows of one config")
    args = p.parse_args()
    if args.config:
        print(
            json.dumps(
                run_one(
                    args.config,
                    args.resolution,
                    args.batch,
                    args.face,
                    args.remat,
                    args.steps,
                    args.face_window,
                    args.face_fraction,
                )
            ),
            flush=True,
        )
        return
    for config, res, batch, face, remat in MATRIX:
        if args.only and config != args.only:
            continue
        cmd = [
            sys.executable,
            __file__,
            f"--config={config}",
            f"--resolution={res}",
            f"--batch={batch}",
            f"--face={face}",
            f"--remat={remat}",
            f"--steps={args.steps}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            err = out.stderr.strip().splitlines()[-1:] or ["no output"]
            print(
                json.dumps(
                    {
                        "config": config,
                        "resolution": res,
                        "batch": batch,
                        "face_loss": bool(face),
                        "remat": bool(remat),
                        "error": err[0],
                    }
                ),
                flush=True,
            )
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
