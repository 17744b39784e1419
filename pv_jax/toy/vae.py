"""Stage 0: the project's ``AutoencoderKL`` at small widths, trained on the training faces.

L1 reconstruction plus a small KL term, horizontal flips as the only augmentation. After
training the latents are standardised per channel (:func:`standardize_latents`): SD's single
``scaling_factor`` leaves these latents with means of 1.1-2.0 against standard deviations of
0.6-1.2, and a UNet trained from scratch on them sampled colour-cast noise (its one-step
denoising was fine; the errors of the high-noise steps carry the offset into the image).
Reported on held-out people: PSNR, and the dlib cosine between each face and its
reconstruction (at the same landmarks), beside the cosine that the 64 px resize alone keeps.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pv_jax.face import descriptor_cosine
from pv_jax.models.presets import random_module
from pv_jax.models.vae import AutoencoderKL, VAEConfig
from pv_jax.toy.fit import FitConfig, fit

TOY_VAE = VAEConfig(
    block_out_channels=(16, 32, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
# 0.5 s a step on 2 cores (bench: 32-64-128 widths took 1.8 s at batch 16).
VAE_FIT = FitConfig(steps=1200, lr=1.5e-3, batch_size=12, warmup=100)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (the inverse of :func:`to_uint8`)."""
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
    """[-1, 1] -> uint8."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def vae_loss(vae: AutoencoderKL, batch: dict, key: jax.Array, kl_weight: float = 1e-6):
    """L1 reconstruction of a posterior draw + kl_weight * KL(posterior || N(0, 1))."""
    x = batch["image"]
    mean, logvar = vae.encode(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = vae.decode(z)
    l1 = jnp.mean(jnp.abs(rec - x))
    kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + kl_weight * kl, {"l1": l1, "kl": kl}


def flip_batch(images: np.ndarray, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """A random batch of images, each mirrored with probability 1/2."""
    idx = rng.integers(0, len(images), batch_size)
    out = images[idx].copy()
    flip = rng.random(batch_size) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def batched(fn, vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """``jax.jit(fn)(vae, x)`` over uint8 images in chunks of ``batch`` (x in [-1, 1])."""
    jitted = jax.jit(fn)
    return np.concatenate(
        [
            np.asarray(jitted(vae, from_uint8(images[i : i + batch])))
            for i in range(0, len(images), batch)
        ]
    )


def reconstruct(vae: AutoencoderKL, images: np.ndarray) -> np.ndarray:
    """uint8 images -> uint8 reconstructions through the posterior mean."""
    return to_uint8(batched(lambda m, x: m.decode(m.encode(x)[0]), vae, images))


def standardize_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> AutoencoderKL:
    """Re-parametrise the VAE so that the posterior means of ``images`` have zero mean and unit
    standard deviation per channel, with ``scaling_factor`` 1; the decoder's output for any
    latent is unchanged: ``quant_conv`` maps to (mean - m) / s (and log-variance - 2 log s), and
    ``post_quant_conv`` takes z * s + m back in its weights."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("standardize_latents needs a VAE with quant_conv and post_quant_conv")
    means = batched(lambda m, x: m.encode(x)[0], vae, images, batch)
    means = means.reshape(-1, vae.config.latent_channels)
    m, s = means.mean(0), means.std(0)
    lc = len(m)
    k, b = (
        np.asarray(vae.quant_conv.kernel.get_value()),
        np.asarray(vae.quant_conv.bias.get_value()),
    )
    k, b = k.copy(), b.copy()
    k[..., :lc] /= s
    b[:lc] = (b[:lc] - m) / s
    b[lc:] -= 2.0 * np.log(s)
    vae.quant_conv.kernel.set_value(jnp.asarray(k))
    vae.quant_conv.bias.set_value(jnp.asarray(b))
    pk = np.asarray(vae.post_quant_conv.kernel.get_value())
    pb = np.asarray(vae.post_quant_conv.bias.get_value())
    vae.post_quant_conv.bias.set_value(jnp.asarray(pb + m @ pk[0, 0]))
    vae.post_quant_conv.kernel.set_value(jnp.asarray(pk * s[:, None]))
    vae.config = dataclasses.replace(vae.config, scaling_factor=1.0, shift_factor=None)
    return vae


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images."""
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(err, 1e-10))


def dlib_descriptors(images: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """dlib's descriptors of faces at known landmarks (no detection), (N, 128)."""
    from pv_jax.data.preprocess import target_descriptor

    return np.stack(
        [target_descriptor(im, lm, 0) for im, lm in zip(images, landmarks, strict=True)]
    )


def train_vae(
    work: Path, out: Path, fit_config: FitConfig = VAE_FIT, config: VAEConfig = TOY_VAE
) -> tuple[AutoencoderKL, dict]:
    """Train (or resume) the toy VAE on the training faces and evaluate it on held-out people;
    the trained VAE goes to ``out/vae`` (diffusers folder), reused when it exists."""
    from pv_jax.toy.data import save_grid, split_arrays
    from pv_jax.weights.hf_folders import load_vae, save_vae

    report_path = out / "vae_report.json"
    if (out / "vae" / "config.json").is_file() and report_path.is_file():
        return load_vae(out / "vae"), json.loads(report_path.read_text())
    size = config.sample_size
    train = split_arrays(work, "train", size)["target"]
    vae = random_module(lambda r: AutoencoderKL(config, rngs=r), np.random.default_rng(0))

    def make_batch(rng):
        return {"image": from_uint8(flip_batch(train, rng, fit_config.batch_size))}

    vae, summary = fit("vae", vae, vae_loss, make_batch, fit_config, work / "vae")
    vae = standardize_latents(vae, train)
    t0 = time.perf_counter()
    held = split_arrays(work, "heldout", size)
    rec = reconstruct(vae, held["target"])
    # The 64 px face against the stored 128 px crop: what the resize alone loses.
    big = split_arrays(work, "heldout", 128)
    d_in = dlib_descriptors(held["target"], held["landmarks"])
    d_rec = dlib_descriptors(rec, held["landmarks"])
    d_big = dlib_descriptors(big["target"], big["landmarks"])
    p = psnr(held["target"], rec)
    c_rec, c_res = descriptor_cosine(d_in, d_rec), descriptor_cosine(d_big, d_in)
    report = dict(
        summary,
        scaling_factor=vae.config.scaling_factor,
        heldout_faces=len(rec),
        psnr_mean=float(p.mean()),
        psnr_std=float(p.std()),
        dlib_cos_reconstruction_mean=float(c_rec.mean()),
        dlib_cos_reconstruction_min=float(c_rec.min()),
        dlib_cos_resize_mean=float(c_res.mean()),
        eval_seconds=round(time.perf_counter() - t0, 1),
    )
    out.mkdir(parents=True, exist_ok=True)
    pairs = np.stack([held["target"][:8], rec[:8]], 1).reshape(-1, size, size, 3)
    save_grid(pairs, out / "vae_reconstructions.png", cols=8)
    shutil.copy(work / "vae" / "metrics.jsonl", out / "vae_metrics.jsonl")
    save_vae(vae, out / "vae")
    report_path.write_text(json.dumps(report, indent=1))
    print(
        f"vae: held-out PSNR {report['psnr_mean']:.2f} dB, dlib cos {c_rec.mean():.3f} "
        f"(resize alone {c_res.mean():.3f}), scaling_factor {vae.config.scaling_factor:.3f}"
    )
    return vae, report
