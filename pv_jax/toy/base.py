"""Stage 1: the toy base model that stands in for Stable Diffusion and CLIP.

- **Text tower**: the project's ``CLIPTextModel`` at small width with the real CLIP vocabulary
  and tokenizer, randomly initialised and frozen (no pretrained text tower exists here; a frozen
  random transformer still maps every caption to its own context, and the UNet learns to read
  it). Token embeddings are drawn at unit scale so that words, not positions, dominate.
- **UNet**: the project's ``UNet2DConditionModel``, trained from scratch (epsilon prediction,
  SD's scaled-linear schedule) on the VAE latents of the training faces, captioned with
  attributes we apply ourselves (``pv_jax.toy.attributes``); 10% empty captions for
  classifier-free guidance.
- **Image encoder**: PhotoVerse's frozen CLIP vision tower is replaced by the project's
  ``CLIPVisionModel`` at small size, pretrained self-supervised (SimCLR: two augmented views of
  the same masked reference crop are pulled together, other photos pushed apart) on the training
  split only, then frozen. It never sees a label or an identity network, as CLIP never did.

Saved through the project's exporter as a diffusers SD folder (``sd/``) and a transformers
``CLIPVisionModel`` folder (``clip_vision/``), which ``train_tpu.py`` reads as any other base.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from pv_jax.diffusion import NoiseSchedule, add_noise
from pv_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    encode_prompt_states,
    preprocess_images,
)
from pv_jax.models.presets import random_module
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.models.vae import AutoencoderKL
from pv_jax.toy import attributes
from pv_jax.toy.fit import FitConfig, fit
from pv_jax.toy.vae import batched

TOY_TEXT = CLIPTextConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
TOY_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=TOY_TEXT.hidden_size,
    norm_num_groups=16,
)
TOY_VISION = CLIPVisionConfig(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    projection_dim=64,
)
# About 0.45 s a step on 2 cores (64-128-128 widths: 1.8 s at batch 32).
UNET_FIT = FitConfig(steps=3000, lr=5e-4, batch_size=16, warmup=200, log_every=50)
VISION_FIT = FitConfig(steps=800, lr=5e-4, batch_size=64, warmup=50, weight_decay=0.05)
CFG_DROP = 0.1  # empty caption rate


def random_text_tower(config: CLIPTextConfig = TOY_TEXT, seed: int = 1) -> CLIPTextModel:
    """A random CLIP text tower with unit-scale token embeddings (frozen from here on)."""
    rng = np.random.default_rng(seed)
    model = random_module(lambda r: CLIPTextModel(config, rngs=r), rng)
    emb = model.embeddings
    emb.token_embedding.embedding.set_value(
        jnp.asarray(rng.standard_normal(emb.token_embedding.embedding.shape), jnp.float32)
    )
    pos = emb.position_embedding.embedding
    pos.set_value(jnp.asarray(0.1 * rng.standard_normal(pos.shape), jnp.float32))
    return model


def caption_contexts(text: CLIPTextModel, tokenizer, captions: list[str]) -> np.ndarray:
    """(C, 77, D) UNet contexts of captions through the frozen text tower."""
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids
    return np.asarray(encode_prompt_states(text, jnp.asarray(np.asarray(ids, np.int32))))


def encode_latents(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """Scaled posterior-mean latents of uint8 images."""
    return batched(lambda m, x: m.scale_latents(m.encode(x)[0]), vae, images)


def diffusion_loss(unet: UNet2DConditionModel, batch: dict, key: jax.Array, schedule):
    """Epsilon-prediction MSE at uniform timesteps."""
    x0, ctx = batch["latents"], batch["context"]
    k1, k2 = jax.random.split(key)
    t = jax.random.randint(k1, (x0.shape[0],), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k2, x0.shape)
    pred = unet(add_noise(schedule, x0, noise, t), t, ctx)
    return jnp.mean((pred - noise) ** 2), {}


def train_unet(
    work: Path,
    out: Path,
    vae: AutoencoderKL,
    fit_config: FitConfig = UNET_FIT,
    init: UNet2DConditionModel | None = None,
):
    """Train (or resume) the base UNet on captioned training latents, from scratch or from
    ``init`` (a trained UNet to continue)."""
    from pv_jax.toy.data import split_arrays
    from pv_jax.weights.hf_folders import load_tokenizer

    size = vae.config.sample_size
    faces = split_arrays(work, "train", size)["target"]
    names = list(attributes.ATTRIBUTES)
    tokenizer = load_tokenizer()
    text = random_text_tower()
    contexts = caption_contexts(text, tokenizer, [attributes.caption(a) for a in names] + [""])
    # Latents of every (photo, attribute, mirror) once: the VAE is frozen.
    variants = np.stack(
        [attributes.apply(a, f) for a in names for f in (faces, faces[:, :, ::-1])]
    )  # (2A, N, H, W, 3)
    lat = encode_latents(vae, variants.reshape(-1, size, size, 3))
    lat = lat.reshape(len(names), 2 * len(faces), *lat.shape[1:])
    probs = np.array([attributes.CAPTION_WEIGHTS[a] for a in names])
    schedule = NoiseSchedule()
    if init is None:
        init = random_module(
            lambda r: UNet2DConditionModel(TOY_UNET, rngs=r), np.random.default_rng(2)
        )
    unet = init

    def make_batch(rng):
        b = fit_config.batch_size
        which = rng.choice(len(names), b, p=probs / probs.sum())
        photo = rng.integers(0, lat.shape[1], b)
        caption = np.where(rng.random(b) < CFG_DROP, len(names), which)
        return {"latents": lat[which, photo], "context": contexts[caption]}

    unet, summary = fit(
        "unet", unet, lambda m, b, k: diffusion_loss(m, b, k, schedule), make_batch, fit_config, out
    )
    return unet, text, tokenizer, schedule, summary


class SimCLR(nnx.Module):
    """The vision tower with a projection head (discarded after pretraining)."""

    def __init__(self, vision: CLIPVisionModel, dim: int, *, rngs: nnx.Rngs):
        h = vision.config.hidden_size
        self.vision = vision
        self.head1 = nnx.Linear(h, h, rngs=rngs)
        self.head2 = nnx.Linear(h, dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        pixels = preprocess_images(images, self.vision.config.image_size)
        pooled = self.vision(pixels).pooler_output
        z = self.head2(jax.nn.relu(self.head1(pooled)))
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def nt_xent(model: SimCLR, batch: dict, key: jax.Array, temperature: float = 0.2):
    """SimCLR's loss over two views; also the top-1 accuracy of finding the other view."""
    z = model(jnp.concatenate([batch["view1"], batch["view2"]]))
    n = z.shape[0] // 2
    logits = z @ z.T / temperature - 1e9 * jnp.eye(2 * n)
    labels = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"top1": jnp.mean(jnp.argmax(logits, -1) == labels)}


def augment(reference: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One random view of a masked reference crop: resized crop, mirror, colour jitter, grey."""
    h = reference.shape[0]
    side = int(h * np.sqrt(rng.uniform(0.6, 1.0)))
    x0, y0 = rng.integers(0, h - side + 1, 2)
    im = Image.fromarray(reference[y0 : y0 + side, x0 : x0 + side]).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    x = np.asarray(im, np.float32) / 255.0
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = x * rng.uniform(0.7, 1.3) * rng.uniform(0.8, 1.2, 3)  # brightness, colour balance
    if rng.random() < 0.2:
        x = np.repeat(x.mean(-1, keepdims=True), 3, -1)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def train_vision(work: Path, out: Path, fit_config: FitConfig = VISION_FIT):
    """Pretrain the image encoder with SimCLR on the training references."""
    from pv_jax.toy.data import split_arrays

    refs = split_arrays(work, "train", 64)["reference"]
    size = TOY_VISION.image_size
    vision = random_module(lambda r: CLIPVisionModel(TOY_VISION, rngs=r), np.random.default_rng(3))
    model = SimCLR(vision, 64, rngs=nnx.Rngs(3))

    def make_batch(rng):
        idx = rng.choice(len(refs), fit_config.batch_size, replace=False)
        views = [np.stack([augment(refs[i], rng, size) for i in idx]) for _ in range(2)]
        return {"view1": views[0], "view2": views[1]}

    model, summary = fit("vision", model, nt_xent, make_batch, fit_config, out)
    return model.vision, summary


def vision_retrieval(vision: CLIPVisionModel, work: Path) -> dict:
    """Held-out check of the encoder: does a mirrored, jittered view of each held-out reference
    find its own photo among all held-out references (top-1), and does the other photo of a
    person find the first (chance = 1 / references)?"""
    from pv_jax.toy.data import split_arrays

    held = split_arrays(work, "heldout", 64)
    refs = held["reference"]
    fn = jax.jit(lambda m, x: m(preprocess_images(x, m.config.image_size)).pooler_output)

    def embed(images):
        z = np.asarray(fn(vision, jnp.asarray(images)))
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    rng = np.random.default_rng(123)
    base = embed(np.stack([np.asarray(Image.fromarray(r).resize((64, 64))) for r in refs]))
    views = embed(np.stack([augment(r, rng, 64) for r in refs]))
    top1 = float(np.mean(np.argmax(views @ base.T, -1) == np.arange(len(refs))))
    return {"heldout_refs": len(refs), "view_top1": top1, "chance": 1.0 / len(refs)}


def train_base(
    work: Path,
    out: Path,
    vae: AutoencoderKL,
    *,
    unet_fit: FitConfig = UNET_FIT,
    vision_fit: FitConfig = VISION_FIT,
    samples: int = 16,
) -> dict:
    """Stage 1: base UNet + frozen text tower + SSL image encoder, exported to ``out/sd`` and
    ``out/clip_vision`` (reused when they exist), with a report on held-out data."""
    from pv_jax.toy.base_eval import sample_plain
    from pv_jax.toy.data import save_grid, split_arrays
    from pv_jax.weights.hf_folders import StableDiffusion, save_clip_vision, save_stable_diffusion

    report_path = out / "base_report.json"
    if (out / "sd" / "model_index.json").is_file() and report_path.is_file():
        return json.loads(report_path.read_text())
    unet, text, tokenizer, schedule, unet_summary = train_unet(work, work / "unet", vae, unet_fit)
    vision, vision_summary = train_vision(work, work / "vision", vision_fit)
    sd = StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler_config=dict(schedule.to_diffusers(), _class_name="DDIMScheduler"),
    )
    # How the base model follows its captions, before any PhotoVerse training.
    t0 = time.perf_counter()
    thresholds = attributes.calibrate(split_arrays(work, "train", vae.config.sample_size)["target"])
    names = list(attributes.ATTRIBUTES)
    # DDIM, 25 steps, CFG 5 against the empty caption; image i from seed i.
    images = {
        a: sample_plain(sd, attributes.caption(a), range(samples), guidance=5.0) for a in names
    }
    report = {
        "unet": unet_summary,
        "vision": vision_summary,
        "vision_retrieval": vision_retrieval(vision, work),
        "thresholds": thresholds,
        "prompt_following": attributes.prompt_following(images, thresholds),
        "samples_per_caption": samples,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_grid(np.concatenate([images[a][:8] for a in names]), out / "base_samples.png", cols=8)
    for run in ("unet", "vision"):
        shutil.copy(work / run / "metrics.jsonl", out / f"{run}_metrics.jsonl")
    save_stable_diffusion(sd, out / "sd")
    save_clip_vision(vision, out / "clip_vision")
    report_path.write_text(json.dumps(report, indent=1))
    pf = report["prompt_following"]
    print(
        "base: "
        + ", ".join(
            f"{a} {v['with_word']:.0%} (without {v['without_word']:.0%})" for a, v in pf.items()
        )
        + f" | encoder view top-1 {report['vision_retrieval']['view_top1']:.2f}"
    )
    return report
