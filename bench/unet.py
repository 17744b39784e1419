"""Benchmark: SD1.5 UNet forward, ours (jitted JAX) vs diffusers (PyTorch), same random weights.

    python bench/unet.py                 # latents 32x32 and 64x64
    python bench/unet.py --latent 32     # one setting

Prints one JSON object per setting (keys: latent, batch, ours_s, torch_s, ratio, compile_s,
gflops_per_s, peak_rss_gib, ...). fp32, batch 2, context 77x768, PyTorch on 2 threads.
On a GPU machine: ``--dtype bfloat16 --attention cudnn`` (PyTorch then runs on CUDA in bf16 too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import compile_timed, compiled_flops, median_time, peak_rss_gib
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from pv_jax.models.layers import abstract_module
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.weights.convert import load_into


def main() -> None:
    """Run the benchmark settings and print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, action="append", help="latent size (default: 32 and 64)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--attention", default="auto", help="attention kernel (see pv_jax.models.attention)"
    )
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--skip-torch", action="store_true", help="time ours only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = UNetConfig()  # SD 1.5

    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = TorchUNet(**cfg.to_diffusers()).eval()
    sd = {k: (lambda v=v: v.detach().numpy()) for k, v in ref.state_dict().items()}
    dtype = jnp.dtype(args.dtype)
    abstract = abstract_module(
        lambda r: UNet2DConditionModel(cfg, dtype=dtype, attention=args.attention, rngs=r)
    )
    ours = load_into(abstract, sd, what="SD1.5 UNet")
    import_s = time.perf_counter() - t0
    print(f"built both UNets and imported weights in {import_s:.1f}s", file=sys.stderr)

    graphdef, state = nnx.split(ours)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = ref.to(device=device, dtype=getattr(torch, args.dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_torch(*a):
        out = ref(*a).sample
        sync()
        return out

    @jax.jit
    def forward(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    for latent in args.latent or [32, 64]:
        r = np.random.RandomState(0)
        x = r.randn(args.batch, 4, latent, latent).astype(np.float32)
        ctx = r.randn(args.batch, 77, 768).astype(np.float32)
        t = np.full((args.batch,), 500, np.int64)
        xj, ctxj, tj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx), jnp.asarray(t)

        compiled, lower_s, compile_s = compile_timed(forward, state, xj, tj, ctxj)
        compile_s += lower_s
        flops = compiled_flops(compiled)
        out = compiled(state, xj, tj, ctxj).block_until_ready()  # warm-up
        ours_s = median_time(args.repeats, compiled, state, xj, tj, ctxj)
        row = {
            "latent": latent,
            "batch": args.batch,
            "dtype": args.dtype,
            "device": jax.devices()[0].device_kind,
            "attention": args.attention,
            "ours_s": round(ours_s, 3),
            "compile_s": round(compile_s, 2),
            "gflops": round(flops / 1e9, 1),
            "gflops_per_s": round(flops / 1e9 / ours_s, 1),
        }
        if not args.skip_torch:
            with torch.inference_mode():
                tdt = getattr(torch, args.dtype)
                tx = torch.from_numpy(x).to(device, tdt)
                tt, tc = torch.from_numpy(t).to(device), torch.from_numpy(ctx).to(device, tdt)
                want = run_torch(tx, tt, tc).float().cpu().numpy()  # warm-up
                torch_s = median_time(args.repeats, run_torch, tx, tt, tc)
            got = np.asarray(out, np.float32).transpose(0, 3, 1, 2)
            row.update(
                torch_s=round(torch_s, 3),
                ratio=round(ours_s / torch_s, 3),
                max_abs_diff=float(np.abs(got - want).max()),
            )
        row.update(peak_rss_gib=round(peak_rss_gib(), 2), import_s=round(import_s, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
