"""Benchmark: PhotoVerse sampling (DDIM + CFG), ours (jitted) vs diffusers' StableDiffusionPipeline.

    python bench/sample.py                       # SD1.5 sizes, 256x256, 25 steps
    python bench/sample.py --resolution 512      # many minutes on a CPU: run it in the background
    python bench/sample.py --preset tiny         # seconds: checks the script
    python bench/sample.py --model sdxl --resolution 512 --steps 4   # SDXL: bench/sample_sdxl.py

Random SD1.5-size networks (UNet, VAE, CLIP text; CLIP ViT-L/14 vision and the adapters for ours).
The UNet, VAE and text encoder weights are copied into diffusers/transformers modules, so both
pipelines run the same base networks; ours also runs PhotoVerse's reference encoding, the
pseudo-words and the image key/value branch (257 extra keys per cross-attention). Batch 1, CFG
guidance 7.5, fp32, PyTorch on ``--threads`` threads, one process.

Prints one JSON object per resolution: ``resolution, steps, compile_s, ours_s_per_image,
torch_s_per_image, ratio, loop_overhead`` and the parts behind them. ``loop_overhead`` is the
jitted denoising loop's time beyond ``steps`` jitted CFG UNet calls (batch 2), as a fraction of
those calls.
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
from common import median_time, peak_rss_gib
from flax import nnx

from pv_jax.photoverse import TINY_CONFIG, PhotoVerseConfig, random_photoverse
from pv_jax.photoverse.attention import UNET_EXTRAS
from pv_jax.sampling import Sampler, SamplerSpec, denoise_loop, encode_references
from pv_jax.weights.convert import CLIP_RULES, export_state
from pv_jax.weights.hf_folders import load_tokenizer

PROMPT = "a photo of S* as an astronaut"


def torch_pipeline(bundle, scheduler_config: dict):
    """diffusers' StableDiffusionPipeline on copies of the bundle's UNet, VAE and text weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig, CLIPTextModel

    model = bundle.model

    def filled(module, state: dict):
        module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        return module.eval()

    unet = filled(
        TorchUNet(**model.unet.config.to_diffusers()), export_state(model.unet, skip=UNET_EXTRAS)
    )
    vae = filled(AutoencoderKL(**model.vae.config.to_diffusers()), export_state(model.vae))
    text = filled(
        CLIPTextModel(CLIPTextConfig(**model.text_encoder.config.to_hf())),
        export_state(model.text_encoder, CLIP_RULES),
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=load_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    """Run the benchmark and print one JSON line per resolution."""
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    known, rest = model.parse_known_args()
    if known.model == "sdxl":
        # Plain SDXL vs StableDiffusionXLPipeline (and PhotoVerse on SDXL): staged processes.
        from sample_sdxl import main as sdxl_main

        return sdxl_main(rest)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="sd15", choices=["sd15", "sdxl"], help="sdxl: see sample_sdxl.py"
    )
    p.add_argument("--preset", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--resolution", type=int, action="append", help="default: 256")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    config = PhotoVerseConfig() if args.preset == "sd15" else TINY_CONFIG
    bundle = random_photoverse(config, args.preset, with_face_net=False)
    build_s = time.perf_counter() - t0
    pipe = None if args.skip_torch else torch_pipeline(bundle, bundle.schedule.to_diffusers())
    print(f"built networks in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    for resolution in args.resolution or [256]:
        row = bench_ours(bundle, resolution, args.steps, args.guidance, args.repeats)
        if pipe is not None:
            torch_s = median_time(args.repeats, run_torch, pipe, resolution, args)
            row.update(torch_s_per_image=round(torch_s, 3), ratio=round(row["ours_s"] / torch_s, 3))
        row["ours_s_per_image"] = row.pop("ours_s")
        row.update(peak_rss_gib=round(peak_rss_gib(), 2), build_s=round(build_s, 1))
        print(json.dumps(dict(preset=args.preset, **row)), flush=True)


def run_torch(pipe, resolution: int, args) -> None:
    """One diffusers generation, the placeholder replaced by a class phrase."""
    with torch.inference_mode():
        pipe(
            PROMPT.replace("S*", "a person"),
            height=resolution,
            width=resolution,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )


def bench_ours(bundle, resolution: int, steps: int, guidance: float, repeats: int) -> dict:
    """Compile and time our sampler, the loop alone, and one CFG UNet call."""
    model, m = bundle.model, bundle.config.words
    sampler = Sampler(model, bundle.schedule)
    tokens = bundle.tokenizer([PROMPT], m)
    empty = bundle.tokenizer.plain([""])
    refs = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    spec = SamplerSpec(steps=steps)
    latent = resolution // model.vae.config.downsample_factor
    noise = jax.random.normal(jax.random.key(0), (1, latent, latent, 4))
    keys = jax.random.split(jax.random.key(1), 1)
    args = (refs, tokens.input_ids, tokens.slots, empty, noise, keys)

    def ours():
        return sampler(*args, num_words=m, guidance=guidance, spec=spec)

    t0 = time.perf_counter()
    jax.block_until_ready(ours())  # compiles (ahead of time, timed apart) and runs once
    first_s = time.perf_counter() - t0
    compile_s = sampler.last_compile_s
    ours_s = median_time(repeats, ours)

    # The loop alone, and one CFG UNet call (batch 2), on the same inputs.
    graphdef, state = nnx.split(model)
    words, image_tokens = jax.jit(encode_references, static_argnums=2)(model, refs, m)
    one = jnp.float32(1.0)

    @jax.jit
    def loop(state, words, image_tokens, noise, keys):
        return denoise_loop(
            nnx.merge(graphdef, state),
            bundle.schedule,
            spec,
            words=words,
            image_tokens=image_tokens,
            input_ids=tokens.input_ids,
            slots=tokens.slots,
            empty_ids=empty,
            noise=noise,
            keys=keys,
            guidance=jnp.float32(guidance),
            gamma=one,
            sigma=one,
            alpha=one,
        )

    loop_args = (state, words, image_tokens, noise, keys)
    jax.block_until_ready(loop(*loop_args))
    loop_s = median_time(repeats, loop, *loop_args)

    @jax.jit
    def unet_call(state, x, context, image_tokens):
        return nnx.merge(graphdef, state).denoise(
            x,
            jnp.asarray(500),
            context,
            image_tokens,
            gamma=jnp.asarray([1.0, 1.0]),
            sigma=jnp.asarray([0.0, 1.0]),
        )

    context = model.encode_text(tokens.input_ids, tokens.slots, words)
    unet_args = (
        state,
        jnp.concatenate([noise, noise]),
        jax.tree.map(lambda c: jnp.concatenate([c, c]), context),
        jnp.concatenate([image_tokens, image_tokens]),
    )
    jax.block_until_ready(unet_call(*unet_args))
    unet_s = median_time(max(3, repeats), unet_call, *unet_args)
    return {
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2),
        "first_call_s": round(first_s, 2),
        "ours_s": round(ours_s, 3),
        "loop_s": round(loop_s, 3),
        "unet_cfg_call_s": round(unet_s, 4),
        "loop_overhead": round(loop_s / (steps * unet_s) - 1.0, 4),
    }


if __name__ == "__main__":
    main()
