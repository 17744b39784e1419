"""Smoke run of the Stable Diffusion networks: ``python -m pv_jax.smoke`` (``make demo``).

Builds tiny random SD networks (UNet, VAE, CLIP text tower with the real CLIP tokenizer), writes
them as a diffusers folder, loads that folder back through the weight importer, runs a jitted
DDIM loop with classifier-free guidance and decodes a PNG under ``outputs/``. Nothing is
downloaded. The weights are random and untrained: the image is noise by design. ``make demo``
now runs ``sample.py`` (PhotoVerse); this remains a check of the plain SD networks and the
folder round trip.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from pv_jax.diffusion import NoiseSchedule, ddim_prev_timesteps, ddim_step, ddim_timesteps
from pv_jax.models.clip import CLIPTextModel
from pv_jax.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, random_module
from pv_jax.models.unet import UNet2DConditionModel
from pv_jax.models.vae import AutoencoderKL
from pv_jax.weights.checkpoints import (
    StableDiffusion,
    load_stable_diffusion,
    load_tokenizer,
    save_stable_diffusion,
)


def tiny_stable_diffusion(seed: int = 0) -> StableDiffusion:
    """Tiny random SD networks with the packaged CLIP tokenizer."""

    rng = np.random.default_rng(seed)
    unet = random_module(lambda r: UNet2DConditionModel(TINY_UNET, rngs=r), rng)
    vae = random_module(lambda r: AutoencoderKL(TINY_VAE, rngs=r), rng)
    text = random_module(lambda r: CLIPTextModel(TINY_TEXT, rngs=r), rng)
    return StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=load_tokenizer(),
        scheduler_config=NoiseSchedule().to_diffusers(),
    )


def make_sampler(sd: StableDiffusion, steps: int, guidance: float):
    """A jitted function: (text ids, empty ids, noise) -> images in [0, 1], NHWC."""
    sched = NoiseSchedule.from_diffusers(sd.scheduler_config)
    ts = ddim_timesteps(sched, steps)
    prev = ddim_prev_timesteps(sched, ts)
    graphdef, state = nnx.split((sd.unet, sd.vae, sd.text_encoder))

    @jax.jit
    def sample(state, ids, empty_ids, noise):
        unet, vae, text = nnx.merge(graphdef, state)
        ctx = text(jnp.concatenate([empty_ids, ids])).last_hidden_state

        def step(x, tp):
            t, pt = tp
            out = unet(jnp.concatenate([x, x]), t, ctx)
            uncond, cond = jnp.split(out, 2)
            eps = uncond + guidance * (cond - uncond)
            return ddim_step(sched, eps, t, pt, x)[0], None

        x, _ = jax.lax.scan(step, noise, (jnp.asarray(ts), jnp.asarray(prev)))
        images = vae.decode(vae.unscale_latents(x))
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    return lambda ids, empty, noise: sample(state, ids, empty, noise)


def main(argv: list[str] | None = None) -> dict:
    """Run the smoke job; returns the summary it writes to ``outputs/smoke.json``."""
    p = argparse.ArgumentParser(description="Smoke run of the SD networks (random weights).")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    timings = {}
    bar = tqdm(total=4, desc="smoke", unit="stage")

    t0 = time.perf_counter()
    folder = save_stable_diffusion(tiny_stable_diffusion(args.seed), args.out / "tiny-sd")
    sd = load_stable_diffusion(folder)
    timings["build_save_load_s"] = time.perf_counter() - t0
    bar.update()

    tok = lambda s: np.asarray(
        sd.tokenizer([s], padding="max_length", max_length=77, truncation=True).input_ids
    )
    ids, empty = tok(args.prompt), tok("")
    hw = TINY_UNET.sample_size
    noise = jax.random.normal(jax.random.key(args.seed), (1, hw, hw, TINY_UNET.in_channels))
    sampler = make_sampler(sd, args.steps, args.guidance)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(ids, empty, noise))
    timings["compile_and_first_run_s"] = time.perf_counter() - t0
    bar.update()

    t0 = time.perf_counter()
    images = np.asarray(jax.block_until_ready(sampler(ids, empty, noise)))
    timings["run_s"] = time.perf_counter() - t0
    bar.update()

    path = args.out / "smoke.png"
    Image.fromarray((images[0] * 255).round().astype(np.uint8)).save(path)
    bar.update()
    bar.close()
    summary = {
        "prompt": args.prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "image": str(path),
        "image_shape": list(images.shape),
        "weights": "random, untrained (tiny SD networks): the image is noise by design",
        **{k: round(v, 3) for k, v in timings.items()},
    }
    (args.out / "smoke.json").write_text(json.dumps(summary, indent=2))
    print(
        f"smoke: wrote {path} ({images.shape[1]}x{images.shape[2]}, {args.steps} DDIM steps, "
        f"CFG {args.guidance}) | load {timings['build_save_load_s']:.1f}s, compile+run "
        f"{timings['compile_and_first_run_s']:.1f}s, run {timings['run_s']:.2f}s | "
        "random untrained weights"
    )
    return summary


if __name__ == "__main__":
    main()
