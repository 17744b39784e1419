"""PhotoVerse's training objective (SPEC.md):

    L = L_diff + w_face L_face + w_treg L_Treg + w_sreg L_Sreg     (0.01 / 0.01 / 0.001)

- L_diff: MSE between the UNet's prediction and its target (noise, or v).
- L_face: 1 - cos(F(face(x0_hat)), F(face(x))) on samples with t <= t_face_max, where x0_hat is
  the single-step clean-latent estimate decoded by the frozen VAE, face() the dlib chip cut by
  the target's 5 landmarks (differentiable) and F the dlib face net.
- L_Treg = mean |S1..Sm|; L_Sreg = mean |V_S| (see :meth:`PhotoVerse.image_value_l1`).

A batch is a dict of arrays:
    reference  (B, R, R, 3)  masked reference face, uint8 or [0, 1]
    target     (B, H, W, 3)  diffusion target image, uint8 or [0, 1]
    landmarks  (B, 5, 2)     dlib's 5 landmarks (x, y) in target pixels
    input_ids, slots (B, L)  placeholder prompts (PlaceholderTokenizer)
    descriptor (B, 128)      optional: the target's face descriptor (else computed with F)
    timesteps  (B,)          optional: fixed diffusion timesteps (else drawn uniformly)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pv_jax.diffusion import NoiseSchedule, add_noise, predict_x0, training_target
from pv_jax.face import align_faces, identity_loss
from pv_jax.photoverse.attention import random_fusion
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.photoverse.model import PhotoVerse

LOSS_TERMS = ("diffusion", "face", "text_reg", "image_reg")


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 (0..255) or float [0, 1] images -> float32 [0, 1]."""
    x = jnp.asarray(images)
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def diffusion_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """L_diff: mean squared error over every latent element."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


def text_reg_loss(words: jax.Array) -> jax.Array:
    """L_Treg: mean absolute value of the pseudo-words (B, m, D)."""
    return jnp.mean(jnp.abs(words))


def face_descriptors(model: PhotoVerse, images01: jax.Array, landmarks: jax.Array) -> jax.Array:
    """dlib descriptors (B, 128) of the faces in [0, 1] images, cut by their 5 landmarks."""
    chips = align_faces(images01 * 255.0, landmarks, quantize=False)
    return model.face_net(chips)


def face_loss(
    model: PhotoVerse,
    schedule: NoiseSchedule,
    prediction: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    landmarks: jax.Array,
    target_descriptor: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """L_face on the samples selected by ``mask``; skipped (0) when no sample is selected."""

    def term() -> jax.Array:
        x0 = predict_x0(schedule, prediction, x_t, t)
        decoded = model.vae.decode(model.vae.unscale_latents(x0))
        images = jnp.clip(decoded / 2 + 0.5, 0.0, 1.0)
        return identity_loss(face_descriptors(model, images, landmarks), target_descriptor, mask)

    return jax.lax.cond(jnp.any(mask), term, lambda: jnp.zeros((), jnp.float32))


def photoverse_loss(
    model: PhotoVerse,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    schedule: NoiseSchedule,
    config: PhotoVerseConfig | None = None,
    fusion: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its metrics (every term, unweighted, plus the face-loss fraction).

    ``fusion``: draw (gamma, sigma) per sample by random fusion (training); otherwise use the
    config's fixed gamma and sigma.
    """
    cfg = config or model.config
    if cfg.face_weight and model.face_net is None:
        raise ValueError(
            f"face_weight={cfg.face_weight} needs a face net: build the model with "
            "with_face_net=True, or set face_weight=0"
        )
    target = to_unit(batch["target"])
    b = target.shape[0]
    k_latent, k_noise, k_t, k_fuse = jax.random.split(key, 4)

    latents = jax.lax.stop_gradient(model.vae.sample_latents(target * 2.0 - 1.0, k_latent))
    t = batch.get("timesteps")
    if t is None:
        t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    x_t = add_noise(schedule, latents, noise, t)

    words, image_tokens = model.encode_reference(batch["reference"])
    context = model.encode_text(batch["input_ids"], batch["slots"], words)
    if fusion:
        gamma, sigma = random_fusion(k_fuse, b, cfg)
    else:
        gamma, sigma = jnp.full((b,), cfg.gamma), jnp.full((b,), cfg.sigma)
    prediction = model.denoise(x_t, t, context, image_tokens, gamma=gamma, sigma=sigma)

    terms = {
        "diffusion": diffusion_loss(prediction, training_target(schedule, latents, noise, t)),
        "text_reg": text_reg_loss(words),
        "image_reg": model.image_value_l1(image_tokens),
    }
    face_mask = t <= cfg.t_face_max
    if cfg.face_weight:
        desc = batch.get("descriptor")
        if desc is None:
            desc = face_descriptors(model, target, batch["landmarks"])
        desc = jax.lax.stop_gradient(desc)
        terms["face"] = face_loss(
            model, schedule, prediction, x_t, t, batch["landmarks"], desc, face_mask
        )
    else:
        terms["face"] = jnp.zeros((), jnp.float32)
    total = (
        terms["diffusion"]
        + cfg.face_weight * terms["face"]
        + cfg.text_reg_weight * terms["text_reg"]
        + cfg.image_reg_weight * terms["image_reg"]
    )
    metrics = {"loss": total, **terms, "face_fraction": jnp.mean(face_mask.astype(jnp.float32))}
    return total, metrics
