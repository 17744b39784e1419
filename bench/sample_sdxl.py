"""Benchmark: plain SDXL text-to-image (DDIM + CFG), ours (jitted) vs diffusers'
StableDiffusionXLPipeline on the same weights, in one invocation.

    python bench/sample.py --model sdxl --resolution 512 --steps 4    # or bench/sample_sdxl.py
    python bench/sample.py --model sdxl --resolution 512 --steps 4 --photoverse

Random SDXL-size networks (UNet 2.57B parameters, both text towers, VAE; about 14 GB in fp32),
so ours and diffusers' copies cannot share one process on a 24 GiB machine. The stages run as
separate processes, one after the other, each waiting until ``--min-free-gib`` are available:

1. ``make``: random weights (fixed seed, :func:`random_module`'s fill: scales 1, biases 0,
   other weights fan-in scaled normal) written once as a diffusers SDXL folder under
   ``--cache`` (reused when present). :func:`save_stable_diffusion` writes the folder (text
   towers, VAE, tokenizers, the DDIM scheduler config, ``model_index.json``); the UNet is
   filled and written tensor by tensor in 2 GiB safetensors shards instead, so that the random
   10.3 GB UNet never exists whole in this process.
2. ``ours``: :func:`load_stable_diffusion`, then :func:`txt2img_latents` and
   :func:`decode_latents`; one untimed compiling call, then ``--repeats`` timed ones.
3. ``torch``: ``StableDiffusionXLPipeline.from_pretrained`` with a ``DDIMScheduler``, the same
   prompt, noise (``latents=``, NCHW), steps and guidance, ``output_type="np"`` (decode on both
   sides), no watermark; one warm-up call, then the timed ones. It compares its final latents
   (read at the last step) and images with ours'.
4. ``photoverse`` (``--photoverse``): the PhotoVerse-on-SDXL sampler of
   ``random_photoverse(PhotoVerseConfig(), "sdxl")`` (OpenCLIP ViT-H/14 image encoder, both
   adapters, the image key/value branch): s/image. About 18 GB in fp32; it runs alone.

Prints one JSON object per side and resolution (``side``: ours, torch, photoverse) and one
comparison object (``ratio`` = ours / torch, ``latent_max_abs_diff``, ``image_max_abs_diff``).
Batch 1, no negative prompt (SDXL's zero unconditional embeddings), fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import current_rss_gib, median_time, peak_rss_gib, reset_peak_rss

PROMPT = "a photo of an astronaut riding a horse"
PV_PROMPT = "a photo of S* as an astronaut"


def available_gib() -> float:
    """MemAvailable from /proc/meminfo (GiB)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(need_gib: float, max_wait_s: float) -> float:
    """Poll every 60 s until ``need_gib`` are available (at most ``max_wait_s``); the GiB then."""
    t0 = time.monotonic()
    while (free := available_gib()) < need_gib and time.monotonic() - t0 < max_wait_s:
        print(f"waiting: {free:.1f} GiB available, need {need_gib}", file=sys.stderr, flush=True)
        time.sleep(60)
    return free


def presets(name: str) -> dict:
    """The network configs of ``--preset``: SDXL base's sizes, or tiny ones (checks the script)."""
    from pv_jax.models import presets as p

    if name == "tiny":
        return dict(
            unet=p.TINY_SDXL_UNET, vae=p.TINY_SDXL_VAE, text=p.TINY_TEXT, text_2=p.TINY_TEXT_2
        )
    return dict(unet=p.SDXL_UNET, vae=p.SDXL_VAE, text=p.SDXL_TEXT, text_2=p.SDXL_TEXT_2)


def noise_nhwc(seed: int, resolution: int, factor: int) -> np.ndarray:
    """The initial latents (1, h, w, 4) both sides start from (``factor``: the VAE's)."""
    h = resolution // factor
    return np.random.default_rng(seed).standard_normal((1, h, h, 4)).astype(np.float32)


class CompileTimer:
    """Sums JAX's compile-time events (tracing, lowering, XLA compilation) while installed."""

    def __init__(self):
        import jax

        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event in (
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration",
        ):
            self.total += duration


# ------------------------------------------------------------------------------ stage: make


def _fill(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    """One parameter, as :func:`pv_jax.models.presets.random_module` fills it."""
    if name == "scale":
        return np.ones(shape, np.float32)
    if name == "bias":
        return np.zeros(shape, np.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
    # The division is in float64 (NumPy 2: a float64 scalar is not weak), then rounded to
    # float32: what random_module's jnp.asarray stores.
    return (rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)).astype(np.float32)


def write_random_unet(folder: Path, config, rng: np.random.Generator) -> int:
    """A random SDXL-size UNet as a diffusers folder (sharded past 10 GiB), streamed by the
    project's writer: one tensor in memory at a time, each filled as
    :func:`pv_jax.models.presets.random_module` fills it, from its own seed drawn from ``rng``.
    Returns the parameter count."""
    from flax import nnx

    from pv_jax.models.layers import abstract_module
    from pv_jax.models.unet import UNet2DConditionModel
    from pv_jax.weights.convert import DEFAULT_RULES, LazyTensor, to_torch_layout, torch_key
    from pv_jax.weights.tensor_files import write_sharded_safetensors

    module = abstract_module(lambda r: UNet2DConditionModel(config, rngs=r))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(module.config.to_diffusers(), indent=2))
    tensors: dict[str, LazyTensor] = {}
    count = 0
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if not isinstance(var, nnx.Param):
            continue
        shape, name = var.get_value().shape, str(path[-1])
        key, layout = torch_key(".".join(str(p) for p in path), DEFAULT_RULES)
        seed = int(rng.integers(2**63))

        def make(shape=shape, name=name, layout=layout, seed=seed) -> np.ndarray:
            value = _fill(shape, name, np.random.default_rng(seed))
            return np.ascontiguousarray(to_torch_layout(value, layout))

        torch_shape = to_torch_layout(np.empty(shape, np.float32), layout).shape
        tensors[key] = LazyTensor(torch_shape, make)
        count += int(np.prod(shape))
    write_sharded_safetensors(folder, "diffusion_pytorch_model", tensors, {"format": "pt"})
    return count


def make_folder(folder: Path, seed: int, preset: str) -> dict:
    """Write the random SDXL folder (unless present); what was made."""
    if (folder / "DONE").is_file():
        return json.loads((folder / "DONE").read_text())
    import jax

    from pv_jax.diffusion import NoiseSchedule
    from pv_jax.models.clip import CLIPTextModel
    from pv_jax.models.presets import TINY_SDXL_UNET, random_module
    from pv_jax.models.unet import UNet2DConditionModel
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.weights.hf_folders import (
        StableDiffusion,
        load_tokenizer,
        load_tokenizer_2,
        save_stable_diffusion,
    )

    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    c = presets(preset)

    def params(module) -> int:
        from flax import nnx

        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))

    sd = StableDiffusion(
        # A tiny stand-in: its unet/ is replaced by the streamed full-size UNet below.
        unet=random_module(lambda r: UNet2DConditionModel(TINY_SDXL_UNET, rngs=r), rng),
        vae=random_module(lambda r: AutoencoderKL(c["vae"], rngs=r), rng),
        text_encoder=random_module(lambda r: CLIPTextModel(c["text"], rngs=r), rng),
        tokenizer=load_tokenizer(),
        # SDXL base's betas and spacing (as SD 1.5's), as a DDIMScheduler config.
        scheduler_config=NoiseSchedule().to_diffusers(),
        text_encoder_2=random_module(
            lambda r: CLIPTextModel(c["text_2"], with_projection=True, rngs=r), rng
        ),
        tokenizer_2=load_tokenizer_2(),
        force_zeros_for_empty_prompt=True,
    )
    counts = {
        "vae": params(sd.vae),
        "text_encoder": params(sd.text_encoder),
        "text_encoder_2": params(sd.text_encoder_2),
    }
    save_stable_diffusion(sd, tmp)
    del sd
    shutil.rmtree(tmp / "unet")
    counts["unet"] = write_random_unet(tmp / "unet", c["unet"], rng)
    info = {
        "params": counts,
        "make_s": round(time.perf_counter() - t0, 1),
        "seed": seed,
        "preset": preset,
    }
    (tmp / "DONE").write_text(json.dumps(info))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return info


# ------------------------------------------------------------------------------ stage: ours


def run_ours(folder: Path, out: Path, args) -> dict:
    """Load the folder, compile and time our txt2img (latents + decode)."""
    import jax

    from pv_jax.host_memory import release_freed_memory
    from pv_jax.sampling.txt2img import decode_latents, txt2img_latents, vae_scale_factor
    from pv_jax.weights.hf_folders import load_stable_diffusion

    timer = CompileTimer()
    phases = {}  # peak resident memory of each phase (GiB), VmHWM reset between them

    def phase(name: str) -> None:
        if args.malloc_trim:  # hand glibc's free heap back first: what is left is really held
            release_freed_memory()
        phases[name] = {
            "peak_gib": round(peak_rss_gib(), 2),
            "after_gib": round(current_rss_gib(), 2),
        }
        reset_peak_rss()

    reset_peak_rss()
    t0 = time.perf_counter()
    sd = load_stable_diffusion(folder)
    load_s = time.perf_counter() - t0
    phase("load")
    noise = noise_nhwc(args.seed, args.resolution, vae_scale_factor(sd))

    def denoise():
        return txt2img_latents(sd, PROMPT, noise=noise, steps=args.steps, guidance=args.guidance)

    def generate():
        latents = denoise()
        return latents, decode_latents(sd, latents)

    timer.total = 0.0  # (loading compiles small programs)
    t0 = time.perf_counter()
    latents = jax.block_until_ready(denoise())
    phase("denoise_first_call")  # the loop's compile and one run
    jax.block_until_ready(denoise())
    phase("denoise_run")
    images = jax.block_until_ready(decode_latents(sd, latents))
    phase("decode_first_call")
    first_s = time.perf_counter() - t0
    compile_s = timer.total
    s_per_image = median_time(args.repeats, generate)  # the same noise: the same images
    phase("timed_calls")
    np.savez(out, latents=np.asarray(latents), images=np.asarray(images))
    return {
        "compile_s": round(compile_s, 2),
        "first_call_s": round(first_s, 2),
        "s_per_image": round(s_per_image, 3),
        "load_s": round(load_s, 1),
        "device": jax.devices()[0].device_kind,
        "weights_gib": round(weights_gib(sd), 2),
        "memory_phases": phases,
        "peak_rss_gib": max(p["peak_gib"] for p in phases.values()),  # the whole run's
    }


def weights_gib(sd) -> float:
    """The loaded networks' parameter bytes (GiB)."""
    import jax
    from flax import nnx

    nets = [sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2]
    return sum(x.nbytes for net in nets for x in jax.tree.leaves(nnx.state(net))) / 2**30


# ----------------------------------------------------------------------------- stage: torch


def run_torch(folder: Path, ours_out: Path, args) -> dict:
    """diffusers' StableDiffusionXLPipeline on the folder: warm-up, timed calls, comparison."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(folder), torch_dtype=torch.float32, add_watermarker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    noise = torch.from_numpy(
        noise_nhwc(args.seed, args.resolution, pipe.vae_scale_factor).transpose(0, 3, 1, 2).copy()
    )
    last: dict = {}

    def keep_latents(pipe, i, t, kwargs):
        last["latents"] = kwargs["latents"]
        return kwargs

    def generate() -> np.ndarray:
        with torch.inference_mode():
            return pipe(
                PROMPT,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=noise.clone(),
                output_type="np",
                callback_on_step_end=keep_latents,
            ).images

    images = generate()  # warm-up (the same noise every call: the same images)
    row = {"s_per_image": round(median_time(args.repeats, generate), 3), "load_s": round(load_s, 1)}
    if ours_out.is_file():
        ours = np.load(ours_out)
        theirs = last["latents"].numpy().transpose(0, 2, 3, 1)
        row.update(
            latent_max_abs_diff=float(np.abs(ours["latents"] - theirs).max()),
            latent_max_abs=float(np.abs(theirs).max()),
            image_max_abs_diff=float(np.abs(ours["images"] - images).max()),
            image_mean_abs_diff=float(np.abs(ours["images"] - images).mean()),
        )
    return row


# ------------------------------------------------------------------------ stage: photoverse


def run_photoverse(args) -> dict:
    """PhotoVerse on random SDXL-size networks: compile and time its sampler."""
    import jax

    from pv_jax.photoverse import PhotoVerseConfig, random_photoverse
    from pv_jax.sampling import Sampler, SamplerSpec
    from pv_jax.sampling.sampler import empty_prompt_ids

    timer = CompileTimer()
    t0 = time.perf_counter()
    if args.preset == "tiny":
        from pv_jax.photoverse import TINY_CONFIG as config
    else:
        config = PhotoVerseConfig()
    kind = "sdxl" if args.preset == "sdxl" else "tiny_sdxl"
    bundle = random_photoverse(config, kind, with_face_net=False)
    build_s = time.perf_counter() - t0
    sampler = Sampler(bundle.model, bundle.schedule)
    m = bundle.config.words
    tokens = bundle.tokenizer([PV_PROMPT], m)
    refs = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    noise = noise_nhwc(args.seed, args.resolution, bundle.model.vae.config.downsample_factor)

    def generate():
        return sampler(
            refs,
            tokens.input_ids,
            tokens.slots,
            noise=noise,
            key=jax.random.key(1),
            input_ids_2=tokens.input_ids_2,
            **empty_prompt_ids(bundle.tokenizer),
            num_words=m,
            guidance=args.guidance,
            spec=SamplerSpec(steps=args.steps),
        )

    timer.total = 0.0  # (building compiles small programs)
    t0 = time.perf_counter()
    jax.block_until_ready(generate())
    first_s = time.perf_counter() - t0
    compile_s = timer.total
    return {
        "compile_s": round(compile_s, 2),
        "first_call_s": round(first_s, 2),
        "s_per_image": round(median_time(args.repeats, generate), 3),
        "build_s": round(build_s, 1),
        "device": jax.devices()[0].device_kind,
    }


# ------------------------------------------------------------------------------- driver


def stage(args, name: str, resolution: int | None = None) -> dict:
    """Run one stage in a fresh process (after waiting for memory); its JSON row."""
    need = args.min_free_gib if name != "make" else min(args.min_free_gib, 10.0)
    free = wait_for_memory(need if args.preset == "sdxl" else 0.0, args.max_wait_s)
    cmd = [sys.executable, __file__, "--stage", name] + _common(args)
    if resolution is not None:
        cmd += ["--resolution", str(resolution)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {done.returncode})")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["available_gib_before"] = round(free, 1)
    row["stage_wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _common(args) -> list[str]:
    return [
        "--steps", str(args.steps),
        "--guidance", str(args.guidance),
        "--repeats", str(args.repeats),
        "--threads", str(args.threads),
        "--seed", str(args.seed),
        "--cache", str(args.cache),
        "--preset", args.preset,
    ] + (["--malloc-trim"] if args.malloc_trim else [])  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sdxl", choices=["sdxl", "tiny"], help="tiny: checks")
    p.add_argument("--resolution", type=int, action="append", help="default: 512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
    p.add_argument("--seed", type=int, default=0, help="weights and noise")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pv_jax" / "bench_sdxl")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--photoverse", action="store_true", help="also PhotoVerse on SDXL")
    p.add_argument("--min-free-gib", type=float, default=18.0, help="before a heavy stage")
    p.add_argument("--max-wait-s", type=float, default=1200.0)
    p.add_argument("--stage", choices=["all", "make", "ours", "torch", "photoverse"])
    p.add_argument(
        "--malloc-trim", action="store_true", help="ours: malloc_trim(0) after each phase"
    )
    return p


def main(argv: list[str] | None = None) -> None:
    """Run the stages and print one JSON line per side and resolution, and comparisons."""
    args = parser().parse_args(argv)
    folder = args.cache / f"{args.preset}_random_seed{args.seed}"
    if args.stage is not None and args.stage != "all":
        res = (args.resolution or [512])[0]
        args.resolution = res
        out = args.cache / f"ours_{args.preset}_{res}px_{args.steps}steps.npz"
        if args.stage == "make":
            row = make_folder(folder, args.seed, args.preset)
        elif args.stage == "ours":
            row = run_ours(folder, out, args)
        elif args.stage == "torch":
            row = run_torch(folder, out, args)
        else:
            row = run_photoverse(args)
        row.setdefault("peak_rss_gib", round(peak_rss_gib(), 2))
        print(json.dumps(row), flush=True)
        return

    base = {"model": args.preset, "steps": args.steps, "guidance": args.guidance, "batch": 1}
    made = stage(args, "make")
    print(json.dumps(dict(side="make", folder=str(folder), **made)), flush=True)
    for res in args.resolution or [512]:
        ours = dict(side="ours", resolution=res, **base, **stage(args, "ours", res))
        print(json.dumps(ours), flush=True)
        if not args.skip_torch:
            torch_row = dict(side="torch", resolution=res, **base, **stage(args, "torch", res))
            torch_row["threads"] = args.threads
            print(json.dumps(torch_row), flush=True)
            compare = {
                "compare": "ours/torch",
                "resolution": res,
                "ratio": round(ours["s_per_image"] / torch_row["s_per_image"], 3),
            }
            for k in ("latent_max_abs_diff", "latent_max_abs", "image_max_abs_diff"):
                compare[k] = torch_row.get(k)
            print(json.dumps(compare), flush=True)
        if args.photoverse:
            pv = dict(side="photoverse", resolution=res, **base, **stage(args, "photoverse", res))
            print(json.dumps(pv), flush=True)


if __name__ == "__main__":
    main()
