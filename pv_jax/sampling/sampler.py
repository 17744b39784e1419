"""PhotoVerse's DDIM sampler: the whole denoising loop in one jitted function.

Compiled once per shape (batch, resolution, m, steps, eta); the knobs gamma, sigma, alpha and
the guidance scale are traced values, so changing them (or the seed) reuses the compilation.
Classifier-free guidance runs the unconditional and conditional passes as one batch: the
unconditional half gets the empty prompt and sigma = 0 (SPEC.md), the conditional half the
placeholder prompt with the pseudo-words and the image tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.diffusion import NoiseSchedule, ddim_prev_timesteps, ddim_step, ddim_timesteps
from pv_jax.models.clip import encode_prompt_states
from pv_jax.photoverse.model import PhotoVerse


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What a compilation depends on (besides array shapes)."""

    steps: int = 25
    eta: float = 0.0
    cfg: bool = True  # batch the unconditional pass for classifier-free guidance
    uncond_gamma: float = 1.0  # the unconditional half: plain text attention, no image branch


def encode_references(model: PhotoVerse, images: jax.Array, num_words: int) -> tuple:
    """Pseudo-words (1, m, D) and image tokens (1, T, C) of R reference photos of one person,
    averaged over the R photos (one photo: no averaging)."""
    words, tokens = model.encode_reference(images, num_words)
    return words.mean(axis=0, keepdims=True), tokens.mean(axis=0, keepdims=True)


def denoise_loop(
    model: PhotoVerse,
    schedule: NoiseSchedule,
    spec: SamplerSpec,
    *,
    words: jax.Array,
    image_tokens: jax.Array,
    input_ids: jax.Array,
    slots: jax.Array,
    empty_ids: jax.Array,
    noise: jax.Array,
    key: jax.Array,
    guidance: jax.Array,
    gamma: jax.Array,
    sigma: jax.Array,
    alpha: jax.Array,
) -> jax.Array:
    """DDIM from ``noise`` (B, h, w, c) to clean latents; words/image tokens (1, ...) or (B, ...).

    With eta > 0, step i's variance noise is ``normal(split(key, steps)[i], noise.shape)``.
    """
    b = noise.shape[0]
    words = jnp.broadcast_to(words, (b, *words.shape[1:]))
    image_tokens = jnp.broadcast_to(image_tokens, (b, *image_tokens.shape[1:]))
    cond = model.encode_text(input_ids, slots, words)
    if spec.cfg:
        uncond = encode_prompt_states(
            model.text_encoder, empty_ids, model.config.text_encoder_layer
        )
        context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
        tokens = jnp.concatenate([image_tokens, image_tokens])
        gammas = jnp.concatenate([jnp.full((b,), spec.uncond_gamma), jnp.full((b,), gamma)])
        sigmas = jnp.concatenate([jnp.zeros((b,)), jnp.full((b,), sigma)])
    else:
        context, tokens = cond, image_tokens
        gammas, sigmas = jnp.full((b,), gamma), jnp.full((b,), sigma)

    ts = ddim_timesteps(schedule, spec.steps)
    prev = ddim_prev_timesteps(schedule, ts)

    def step(x, inputs):
        t, pt, k = inputs
        x_in = jnp.concatenate([x, x]) if spec.cfg else x
        out = model.denoise(x_in, t, context, tokens, gamma=gammas, sigma=sigmas, alpha=alpha)
        if spec.cfg:
            out_uncond, out_cond = jnp.split(out, 2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        eps_noise = jax.random.normal(k, x.shape, x.dtype) if spec.eta > 0 else None
        x, _ = ddim_step(schedule, out, t, pt, x, eta=spec.eta, noise=eps_noise)
        return x, None

    keys = jax.random.split(key, len(ts))
    x, _ = jax.lax.scan(step, noise, (jnp.asarray(ts), jnp.asarray(prev), keys))
    return x


class Sampler:
    """A compiled PhotoVerse sampler over a fixed model: call it with references, prompts and
    knobs; it compiles once per shape and spec."""

    def __init__(self, model: PhotoVerse, schedule: NoiseSchedule):
        self.graphdef, self.state = nnx.split(model)
        self.schedule = schedule
        self.traces = 0  # how many times the loop was traced (tests, diagnostics)
        self._jitted = jax.jit(self._run, static_argnames=("spec", "num_words", "decode"))

    def _run(
        self,
        state,
        refs,
        input_ids,
        slots,
        empty_ids,
        noise,
        key,
        knobs,
        *,
        spec,
        num_words,
        decode,
    ):
        self.traces += 1  # runs at trace time only
        model = nnx.merge(self.graphdef, state)
        words, tokens = encode_references(model, refs, num_words)
        latents = denoise_loop(
            model,
            self.schedule,
            spec,
            words=words,
            image_tokens=tokens,
            input_ids=input_ids,
            slots=slots,
            empty_ids=empty_ids,
            noise=noise,
            key=key,
            **knobs,
        )
        if not decode:
            return latents
        images = model.vae.decode(model.vae.unscale_latents(latents))
        return jnp.clip(images / 2 + 0.5, 0.0, 1.0)

    def __call__(
        self,
        refs: np.ndarray,
        input_ids: np.ndarray,
        slots: np.ndarray,
        empty_ids: np.ndarray,
        noise: jax.Array,
        key: jax.Array,
        *,
        num_words: int,
        guidance: float = 7.5,
        gamma: float = 1.0,
        sigma: float = 1.0,
        alpha: float = 1.0,
        spec: SamplerSpec = SamplerSpec(),
        decode: bool = True,
        state: nnx.State | None = None,
    ) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] (or latents with ``decode=False``).

        ``state``: other weights for the same model (e.g. the current ones during training);
        the compilation is reused.
        """
        knobs = {
            k: jnp.asarray(v, jnp.float32)
            for k, v in dict(guidance=guidance, gamma=gamma, sigma=sigma, alpha=alpha).items()
        }
        return self._jitted(
            self.state if state is None else state,
            jnp.asarray(refs),
            jnp.asarray(input_ids),
            jnp.asarray(slots),
            jnp.asarray(empty_ids),
            noise,
            key,
            knobs,
            spec=spec,
            num_words=num_words,
            decode=decode,
        )
