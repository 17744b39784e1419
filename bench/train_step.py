"""Benchmark: one PhotoVerse train step (forward + backward + AdamW) on this machine.

    python bench/train_step.py                           # the matrix below, one process each
    python bench/train_step.py --only sdxl               # the matrix rows of one config
    python bench/train_step.py --config sd15 --resolution 256 --batch 1 --face 1 --remat 1
    python bench/train_step.py --config sd15 --resolution 512 --steps 0   # FLOPs only
    python bench/train_step.py --config sdxl --resolution 1024 --batch 4 --fsdp 4  # compile only

Each setting runs in its own process (so that peak RSS is its own) on random networks of the
preset (``tiny``; ``sd15``: SD1.5 UNet/VAE/text + CLIP ViT-L/14 vision, 1.37B parameters;
``tiny_sdxl``; ``sdxl``: configs/photoverse_sdxl.py on random SDXL-shaped networks), synthetic
batches, on the CPU. Prints one JSON object per setting with ``config, resolution, batch, fsdp,
face_loss, remat, step_gflop`` (XLA's cost analysis of the compiled step, per device), XLA's
memory analysis per device, compile time and peak RSS, and for timed settings ``step_s,
examples_per_s, gflops_per_s`` and the parameter counts.

``--fsdp N`` compiles on N CPU devices (``--xla_force_host_platform_device_count=N`` is set
before JAX is imported) with the mesh (data=1, fsdp=N), as ``mesh.fsdp`` does on a TPU host;
``--devices D`` compiles on D devices, the mesh (data=D/N, fsdp=N): a slice of D chips.
``--grad-accum K`` runs the global batch as K microbatches inside the step (train.grad_accum).

``sdxl`` (and any setting with ``--abstract 1``) is compile-only and never allocates a weight:
the model is built under ``nnx.eval_shape``, the train state under ``jax.eval_shape``, and the
trainer's jitted step (``trainer.jit_train_step``, with its shardings) is lowered from
``jax.ShapeDtypeStruct``\\ s. Its rows add the projected TPU v5p throughput (peak bf16 FLOP/s x
an assumed MFU / the step's FLOPs per device) and whether XLA's memory per device fits a v5p
chip's HBM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import compile_timed, compiled_flops, peak_rss_gib

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["tiny", "sd15", "tiny_sdxl", "sdxl"]
# config, resolution, global batch, face loss, remat, fsdp (CPU devices of the mesh)
# [, face_batch_fraction (default: P(t <= t_face_max))]
MATRIX = [
    ("tiny", 32, 1, 1, 0, 1),
    ("tiny", 32, 2, 1, 0, 1),
    ("tiny", 32, 2, 0, 0, 1),
    ("tiny", 32, 2, 1, 1, 1),
    ("sd15", 256, 1, 1, 1, 1),
    ("sd15", 256, 1, 0, 1, 1),
    ("sd15", 256, 1, 1, 0, 1),
    ("sd15", 256, 2, 1, 1, 1),
    ("tiny_sdxl", 32, 2, 1, 0, 1),
    ("tiny_sdxl", 32, 2, 0, 0, 1),
    ("tiny_sdxl", 32, 2, 1, 1, 1),
    ("tiny_sdxl", 32, 2, 1, 0, 2),
    # SDXL (compile only): configs/photoverse_sdxl.py's one v5p host, batch 1 per device.
    ("sdxl", 1024, 4, 1, 1, 4),
    ("sdxl", 1024, 4, 0, 1, 4),
    ("sdxl", 512, 4, 1, 1, 4),
    ("sdxl", 512, 4, 0, 1, 4),
]
COMPILE_ONLY = {"sdxl"}  # built abstractly: the CPU could not hold, let alone run, the step

# The projection of the abstract rows: one TPU v5p chip (metrics.PEAK_TFLOPS) and its HBM.
V5P = "TPU v5p"
V5P_HBM_BYTES = 95e9
V5P_CHIPS_PER_HOST = 4
ASSUMED_MFU = 0.40


# LLVM's optimisation level only: XLA's HLO passes, buffer assignment (the memory analysis) and
# cost analysis run before it and are unchanged (checked: docs/BENCHMARKS.md), while the CPU
# compile of a compile-only row takes about 40% less time. The code it makes is slower, so
# timed rows never use it.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def set_xla_flags(n: int, fast_compile: bool) -> None:
    """Set the CPU device count and the compile-only flags (before JAX is imported)."""
    set_cpu_devices(n)
    if fast_compile:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAGS}".strip()


def set_cpu_devices(n: int) -> None:
    """Make the CPU backend show ``n`` devices (before JAX is imported)."""
    if n <= 1:
        return
    if "jax" in sys.modules:
        raise RuntimeError("set the CPU device count before importing jax")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def make_config(
    config: str,
    resolution: int,
    batch: int,
    face: bool,
    remat: bool,
    fsdp: int,
    face_window: float | None,
    face_fraction: float | None,
    attention: str | None,
    face_rollout: int | None = None,
):
    """The run config of a setting (synthetic data, random networks of the preset)."""
    from configs import photoverse_sdxl, tiny

    if config in ("tiny", "sd15"):
        cfg = tiny.get_config()
        if config == "sd15":
            from pv_jax.photoverse import PhotoVerseConfig

            cfg.model = PhotoVerseConfig().to_dict()
            cfg.base.kind = "random_sd15"
    elif config == "tiny_sdxl":
        cfg = photoverse_sdxl.get_config("tiny")
    else:  # the SDXL run config (bf16, remat, ViT-H/14, its text layers) on random networks
        cfg = photoverse_sdxl.get_config(f"fsdp={fsdp}")
        cfg.base.kind = "random_sdxl"
        cfg.data.source = "synthetic"
        # What "auto" runs on a TPU; on the CPU it would be the blocked kernel, a loop whose
        # FLOPs XLA's cost analysis counts once instead of once per block.
        cfg.base.attention = "xla"
    cfg.data.resolution = resolution
    cfg.train.batch_size = batch
    cfg.base.remat = bool(remat)
    cfg.mesh.fsdp = fsdp
    if attention:
        cfg.base.attention = attention
    if not face:
        cfg.model.face_weight = 0.0
    if face_window is not None:
        cfg.model.face_window = face_window
    if face_fraction is not None:
        cfg.model.face_batch_fraction = face_fraction
    if face_rollout is not None:
        cfg.model.face_rollout_steps = face_rollout
    return cfg


def gib(n: float) -> float:
    """Bytes -> GiB, 3 decimals."""
    return round(n / 2**30, 3)


def memory_record(compiled) -> dict:
    """XLA's memory analysis of the compiled step, per device: the sum (arguments + outputs -
    outputs aliased to donated arguments + temporaries + generated code) and the parts."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    parts = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }
    total = (
        parts["argument"]
        + parts["output"]
        - parts["alias"]
        + parts["temp"]
        + parts["generated_code"]
    )
    record = {
        "memory_per_device_gib": gib(total),
        "memory_parts_gib": {k: gib(v) for k, v in parts.items()},
        "memory_per_device_bytes": total,
    }
    return record


def v5p_projection(flops_per_device: float, batch: int, devices: int, memory: int | None):
    """Examples/s a v5p chip and host would do at ASSUMED_MFU, and the HBM margin."""
    from pv_jax.train.metrics import PEAK_TFLOPS

    if not flops_per_device:
        return {}
    step_s = flops_per_device / (PEAK_TFLOPS[V5P] * 1e12 * ASSUMED_MFU)
    per_chip = batch / devices / step_s
    record = {
        "v5p_assumed_mfu": ASSUMED_MFU,
        "v5p_step_s": round(step_s, 4),
        "v5p_examples_per_s_chip": round(per_chip, 2),
        "v5p_examples_per_s_host": round(per_chip * V5P_CHIPS_PER_HOST, 2),
    }
    if memory:
        record["v5p_hbm_fraction"] = round(memory / V5P_HBM_BYTES, 3)
        record["v5p_hbm_margin_gb"] = round((V5P_HBM_BYTES - memory) / 1e9, 1)
    return record


def run_one(
    config: str,
    resolution: int,
    batch: int,
    face: bool,
    remat: bool,
    steps: int,
    face_window: float | None = None,
    face_fraction: float | None = None,
    fsdp: int = 1,
    abstract: bool = False,
    attention: str | None = None,
    fast_compile: bool = True,
    face_rollout: int | None = None,
    grad_accum: int = 1,
    devices: int | None = None,
):
    """Build, compile and time the step (or only compile it); returns the JSON record."""
    abstract = abstract or config in COMPILE_ONLY
    devices = devices or fsdp
    set_xla_flags(devices, fast_compile and (abstract or steps == 0))
    import jax

    from pv_jax.train import sharding, trainer

    cfg = make_config(
        config,
        resolution,
        batch,
        face,
        remat,
        fsdp,
        face_window,
        face_fraction,
        attention,
        face_rollout,
    )
    cfg.train.grad_accum = grad_accum
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(-1, fsdp)
    run = trainer.setup(cfg, mesh, abstract=abstract)
    step, trainable_params, frozen_params = run.step, run.trainable_params, run.frozen_params
    if abstract:  # shapes only: nothing is allocated, the step is lowered and compiled
        args = (run.host_state, run.frozen, trainer.abstract_batch(run))
    else:
        state = sharding.put_global(run.host_state, run.state_sh)
        run.host_state = None
        args = (state, run.frozen, sharding.put_batch(next(run.data), mesh))
    build_s = time.perf_counter() - t0
    compiled, lower_s, compile_s = compile_timed(step, *args)
    # Per device: the cost of the SPMD-partitioned program (K microbatches: K x the scan body).
    flops = compiled_flops(compiled) * grad_accum
    memory = memory_record(compiled)
    record = {
        "config": config,
        "resolution": resolution,
        "batch": batch,
        "fsdp": fsdp,
        "devices": devices,
        "grad_accum": grad_accum,
        "face_loss": bool(face),
        "remat": bool(remat),
        "dtype": cfg.base.dtype,
        "attention": cfg.base.attention,
        "face_window": cfg.model.face_window,
        "face_fraction": cfg.model.face_batch_fraction,
        "face_rollout_steps": cfg.model.get("face_rollout_steps", 1),
        "step_gflop": round(flops / 1e9, 2),
        "gflop_per_example": round(flops * devices / batch / 1e9, 2),
        **memory,
        "xla_fast_compile": FAST_COMPILE_FLAGS in os.environ.get("XLA_FLAGS", ""),
        "trainable_params": trainable_params,
        "params": trainable_params + frozen_params,
        "build_s": round(build_s, 2),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
    }
    if config in ("sd15", "sdxl"):
        memory_bytes = memory.get("memory_per_device_bytes")
        record.update(v5p_projection(flops, batch, devices, memory_bytes))
    if abstract or steps == 0:  # compile only: a setting too slow (or too big) to run here
        return {**record, "peak_rss_gib": round(peak_rss_gib(), 2)}
    state, frozen, batch_arrays = args
    times = []
    for _ in range(steps + 1):  # the first call also allocates: not timed
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    return {
        **record,
        "step_s": round(step_s, 4),
        "examples_per_s": round(batch / step_s, 3),
        "gflops_per_s": round(flops / step_s / 1e9, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "loss": float(metrics["loss"]),
        "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    """Run one setting (flags given) or the whole matrix (each in a subprocess)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=CONFIGS)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="global batch (over all devices)")
    p.add_argument("--face", type=int, default=1)
    p.add_argument("--remat", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=1, help="CPU devices of the (1, fsdp) mesh")
    p.add_argument("--devices", type=int, default=None, help="mesh (devices/fsdp, fsdp)")
    p.add_argument("--grad-accum", type=int, default=1, help="microbatches per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps; 0: compile only")
    p.add_argument("--abstract", type=int, default=0, help="1: compile from abstract shapes")
    p.add_argument("--attention", help="base.attention (default: the config's; sdxl: xla)")
    p.add_argument(
        "--face-window", type=float, default=None, help="1.0: whole-image decode (default)"
    )
    p.add_argument(
        "--face-fraction", type=float, default=None, help="face sub-batch (default: P(t<=500))"
    )
    p.add_argument(
        "--fast-compile",
        type=int,
        default=1,
        help="compile-only settings: 1 (default) LLVM opt level 0 (same memory and FLOPs)",
    )
    p.add_argument(
        "--face-rollout",
        type=int,
        default=None,
        help="model.face_rollout_steps: the face loss on a K-step DDIM rollout (default: 1)",
    )
    p.add_argument("--only", choices=CONFIGS, help="run the matrix rows of one config")
    args = p.parse_args()
    if args.config:
        record = run_one(
            args.config,
            args.resolution,
            args.batch,
            args.face,
            args.remat,
            args.steps,
            args.face_window,
            args.face_fraction,
            args.fsdp,
            bool(args.abstract),
            args.attention,
            bool(args.fast_compile),
            args.face_rollout,
            args.grad_accum,
            args.devices,
        )
        print(json.dumps(record), flush=True)
        return
    for config, res, batch, face, remat, fsdp, *fraction in MATRIX:
        if args.only and config != args.only:
            continue
        extra = [f"--face-fraction={fraction[0]}"] if fraction else []
        cmd = [
            sys.executable,
            __file__,
            f"--config={config}",
            f"--resolution={res}",
            f"--batch={batch}",
            f"--face={face}",
            f"--remat={remat}",
            f"--fsdp={fsdp}",
            f"--steps={args.steps}",
            *extra,
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
                        "fsdp": fsdp,
                        "face_loss": bool(face),
                        "remat": bool(remat),
                        "face_fraction": fraction[0] if fraction else None,
                        "error": err[0],
                    }
                ),
                flush=True,
            )
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
