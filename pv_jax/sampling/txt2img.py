"""Plain text-to-image with Stable Diffusion (1.x, 2.x) or SDXL: DDIM with classifier-free
guidance, no PhotoVerse.

The prompt encoding follows diffusers' pipelines (``StableDiffusionPipeline.encode_prompt`` and
``StableDiffusionXLPipeline.encode_prompt``, without ``clip_skip`` or LoRA scales):

- SD: the context is the text encoder's ``last_hidden_state``; the unconditional half of
  guidance encodes the negative prompt, the empty string when none is given.
- SDXL: the context is both towers' penultimate hidden states, concatenated; the pooled
  embedding is tower 2's projected EOS state, and the time ids are original size, crop top-left
  and target size (``original = target = (H, W)`` of the image, crop (0, 0) by default, the
  same ids for the unconditional half). Without a negative prompt and with the pipeline's
  ``force_zeros_for_empty_prompt`` the unconditional context and pooled embedding are zeros;
  otherwise the negative prompt (empty string when None) is encoded like a prompt, its pooled
  embedding from tower 2. ``prompts_2`` / ``negative_prompts_2`` (tower 2's prompts) default to
  ``prompts`` / ``negative_prompts``.

Guidance runs when ``guidance > 1`` (diffusers' rule), as one batch [unconditional,
conditional]. Text encoding and the whole denoising loop (``jax.lax.scan``) are one jitted
program, compiled once per model structure, shapes and (steps, eta, schedule, guidance on/off);
the guidance scale is a traced value. Latents are NHWC.

The sampler is DDIM whatever scheduler class the folder names (SDXL base ships Euler): the
folder's scheduler config gives the betas, spacing and prediction type.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.diffusion import (
    NoiseSchedule,
    ddim_loop,
    ddim_prev_timesteps,
    ddim_timesteps,
    step_keys,
)
from pv_jax.models.sdxl import encode_sdxl_prompt, sdxl_time_ids
from pv_jax.weights.hf_folders import StableDiffusion

Prompts = str | Sequence[str]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one compilation depends on besides the model structure and array shapes."""

    schedule: NoiseSchedule
    steps: int
    eta: float
    cfg: bool  # classifier-free guidance (guidance > 1)


def _as_list(prompts: Prompts | None, batch: int, what: str) -> list[str] | None:
    if prompts is None:
        return None
    out = [prompts] * batch if isinstance(prompts, str) else list(prompts)
    if len(out) != batch:
        raise ValueError(f"{what} has {len(out)} prompts, but there are {batch} prompts")
    return out


def _tokenize(tokenizer, prompts: list[str], max_positions: int) -> np.ndarray:
    """(B, L) ids, padded to the tokenizer's length (77) and truncated, as diffusers does."""
    length = min(int(tokenizer.model_max_length), max_positions)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int32)


def _encode(te, te2, ids: jax.Array, ids_2: jax.Array | None):
    """(context, pooled or None) of one batch of token ids."""
    if te2 is None:
        return te(ids).last_hidden_state, None
    return encode_sdxl_prompt(te, te2, ids, ids_2)


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _denoise(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids: jax.Array,
    ids_2: jax.Array | None,
    neg_ids: jax.Array | None,
    neg_ids_2: jax.Array | None,
    noise: jax.Array,
    time_ids: jax.Array | None,
    guidance: jax.Array,
    zero_negative: jax.Array,
    keys: jax.Array | None,
    *,
    plan: _Plan,
) -> jax.Array:
    """The jitted text encoding and DDIM loop (arguments: see :func:`txt2img_latents`).

    ``zero_negative`` (a traced bool, so that both cases share one compilation): zeros replace
    the encoded negative prompt's context and pooled embedding.
    """
    unet, te, te2 = nnx.merge(graphdef, state)
    context, pooled = _encode(te, te2, ids, ids_2)
    if plan.cfg:
        neg_context, neg_pooled = _encode(te, te2, neg_ids, neg_ids_2)
        neg_context = jnp.where(zero_negative, 0.0, neg_context).astype(neg_context.dtype)
        if neg_pooled is not None:
            neg_pooled = jnp.where(zero_negative, 0.0, neg_pooled).astype(neg_pooled.dtype)
        context = jnp.concatenate([neg_context, context.astype(neg_context.dtype)])
        if pooled is not None:
            pooled = jnp.concatenate([neg_pooled, pooled.astype(neg_pooled.dtype)])
            time_ids = jnp.concatenate([time_ids, time_ids])
    extra = {} if pooled is None else dict(text_embeds=pooled, time_ids=time_ids)

    schedule = plan.schedule
    ts = ddim_timesteps(schedule, plan.steps)
    per_step = None
    if plan.eta > 0:
        per_step = step_keys(keys, plan.steps)  # row b's noise does not depend on the batch
    return ddim_loop(
        schedule,
        lambda x_in, t: unet(x_in, t, context, **extra),
        noise.astype(jnp.float32),
        ts,
        ddim_prev_timesteps(schedule, ts),
        guidance=guidance,
        cfg=plan.cfg,
        eta=plan.eta,
        step_keys=per_step,
    )


def vae_scale_factor(sd: StableDiffusion) -> int:
    """Pixels per latent pixel (diffusers' ``vae_scale_factor``: 8 for SD and SDXL)."""
    return sd.vae.config.downsample_factor


def txt2img_latents(
    sd: StableDiffusion,
    prompts: Prompts,
    *,
    noise: jax.Array,
    negative_prompts: Prompts | None = None,
    prompts_2: Prompts | None = None,
    negative_prompts_2: Prompts | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    eta: float = 0.0,
    key: jax.Array | None = None,
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> jax.Array:
    """DDIM from ``noise`` (B, h, w, 4) to clean latents (B, h, w, 4) (scaled, NHWC, float32).

    ``prompts``: one string or B strings; ``negative_prompts`` likewise (None: the empty
    prompt, or zeros for an SDXL pipeline with ``force_zeros_for_empty_prompt``). ``prompts_2``
    / ``negative_prompts_2``: SDXL tower 2's prompts (default: the same). Guidance runs when
    ``guidance > 1``. ``eta > 0`` needs ``key`` (one key, split over the rows, or (B,) keys).
    SDXL's micro-conditioning: ``original_size`` / ``target_size`` (h, w) in pixels (default
    the image's, ``h * vae_scale_factor``), ``crop_top_left`` (top, left). The initial noise is
    used as given (DDIM's initial sigma is 1).
    """
    b = noise.shape[0]
    prompts = _as_list(prompts, b, "prompts")
    negative = _as_list(negative_prompts, b, "negative_prompts")
    cfg = guidance > 1.0
    xl = sd.is_xl
    zero_negative = xl and cfg and negative is None and sd.force_zeros_for_empty_prompt
    te_len = sd.text_encoder.config.max_position_embeddings

    ids = _tokenize(sd.tokenizer, prompts, te_len)
    ids_2 = neg_ids = neg_ids_2 = time_ids = None
    if xl:
        te2_len = sd.text_encoder_2.config.max_position_embeddings
        # diffusers' `prompt_2 or prompt`: an empty string falls back too (so `or None` first).
        ids_2 = _tokenize(
            sd.tokenizer_2, _as_list(prompts_2 or None, b, "prompts_2") or prompts, te2_len
        )
    if cfg:  # (the empty prompt is encoded, then zeroed, in the zero_negative case)
        negative = negative or [""] * b
        neg_ids = _tokenize(sd.tokenizer, negative, te_len)
        if xl:
            negative_2 = _as_list(negative_prompts_2 or None, b, "negative_prompts_2") or negative
            neg_ids_2 = _tokenize(sd.tokenizer_2, negative_2, te2_len)
    if xl:
        f = vae_scale_factor(sd)
        size = (noise.shape[1] * f, noise.shape[2] * f)
        time_ids = sdxl_time_ids(original_size or size, crop_top_left, target_size or size, b)

    keys = None
    if eta > 0:
        if key is None:
            raise ValueError("eta > 0 needs a key for DDIM's variance noise")
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        keys = jax.random.split(key, b) if key.ndim == (0 if typed else 1) else key

    plan = _Plan(
        schedule=NoiseSchedule.from_diffusers(sd.scheduler_config),
        steps=steps,
        eta=float(eta),
        cfg=cfg,
    )
    graphdef, state = nnx.split((sd.unet, sd.text_encoder, sd.text_encoder_2))
    return _denoise(
        graphdef,
        state,
        ids,
        ids_2,
        neg_ids,
        neg_ids_2,
        jnp.asarray(noise),
        None if time_ids is None else jnp.asarray(time_ids),
        jnp.asarray(guidance, jnp.float32),
        jnp.asarray(zero_negative),
        keys,
        plan=plan,
    )


@jax.jit
def _decode(vae, latents: jax.Array) -> jax.Array:
    return vae.decode_images(latents)


def decode_latents(sd: StableDiffusion, latents: jax.Array) -> jax.Array:
    """Scaled latents (B, h, w, 4) -> images (B, h * f, w * f, 3) in [0, 1]."""
    return _decode(sd.vae, latents)


def txt2img(
    sd: StableDiffusion,
    prompts: Prompts,
    *,
    key: jax.Array,
    height: int | None = None,
    width: int | None = None,
    **kwargs,
) -> jax.Array:
    """Images (B, height, width, 3) in [0, 1] for B prompts: noise drawn from ``key``, then
    :func:`txt2img_latents` (``kwargs``: negative prompts, steps, guidance, eta, sizes) and the
    VAE. ``height`` / ``width`` default to the UNet's sample size times the VAE factor."""
    b = 1 if isinstance(prompts, str) else len(prompts)
    f = vae_scale_factor(sd)
    default = sd.unet.config.sample_size * f
    height, width = height or default, width or default
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    noise_key, eta_key = jax.random.split(key)
    shape = (b, height // f, width // f, sd.unet.config.in_channels)
    noise = jax.random.normal(noise_key, shape, jnp.float32)
    latents = txt2img_latents(sd, prompts, noise=noise, key=eta_key, **kwargs)
    return decode_latents(sd, latents)
