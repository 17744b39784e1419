"""PhotoVerse's DDIM sampler: the whole denoising loop in one jitted function.

Compiled once per shape (batch, resolution, m, steps, eta, strength); the knobs gamma, sigma,
alpha and the guidance scale are traced values, so changing them (or the seed) reuses the
compilation. Classifier-free guidance runs the unconditional and conditional passes as one
batch: the unconditional half gets the empty prompt and sigma = 0 (SPEC.md), through the frozen
base or the trained LoRA (``SamplerSpec.uncond``); the conditional half the placeholder prompt
with the pseudo-words and the image tokens. Each batch row has its own noise and random key, so
an image depends on its seed only, not on the batch it was drawn in.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_loop,
    ddim_prev_timesteps,
    ddim_timesteps,
    step_keys,
)
from pv_jax.errors import InputError
from pv_jax.host_memory import release_freed_memory
from pv_jax.photoverse.model import PhotoVerse, default_time_ids

UNCOND_MODES = ("base", "lora")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What a compilation depends on (besides array shapes)."""

    steps: int = 25
    eta: float = 0.0
    cfg: bool = True  # batch the unconditional pass for classifier-free guidance
    # The unconditional half (empty prompt, sigma 0; SPEC.md) runs either through the frozen
    # base model ("base": no LoRA, text weight 1: the prediction SD itself was trained to make
    # for the empty prompt) or through the trained LoRA ("lora", with text weight gamma + sigma:
    # random fusion always trains gamma + sigma = 2). docs/experiments/history.md measures both.
    uncond: str = "base"
    # img2img: start from the init image noised to the step int(steps * strength) before the end
    # (diffusers' img2img rule) and run only those steps; 1.0 runs every step.
    strength: float = 1.0

    def __post_init__(self):  # user settings (sample.py's flags, a config): InputError
        if self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.uncond not in UNCOND_MODES:
            raise InputError(f"uncond must be one of {UNCOND_MODES}, got {self.uncond!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise InputError(f"eta must be in [0, 1], got {self.eta}")
        if not 0.0 < self.strength <= 1.0 or int(self.steps * self.strength) < 1:
            raise InputError(
                f"strength {self.strength} with {self.steps} steps runs no step: use a strength "
                f"in (1/steps, 1] (e.g. 0.6), or more steps"
            )

    @property
    def start(self) -> int:
        """Index of the first DDIM step that runs (0 unless img2img)."""
        return self.steps - min(int(self.steps * self.strength), self.steps)


def encode_references(
    model: PhotoVerse, images: jax.Array, num_words: int, descriptors: jax.Array | None = None
) -> tuple:
    """Pseudo-words (1, m, D) and image tokens (1, T, C) of R reference photos of one person,
    averaged over the R photos (one photo: no averaging); ``descriptors`` (R, 128): their dlib
    descriptors, for identity tokens."""
    words, tokens = model.encode_reference(images, num_words, descriptors)
    return words.mean(axis=0, keepdims=True), tokens.mean(axis=0, keepdims=True)


def empty_prompt_ids(tokenizer) -> dict[str, np.ndarray]:
    """The empty prompt's ids for guidance, as :class:`Sampler` keywords (``empty_ids``, and
    ``empty_ids_2`` with SDXL's second tokenizer)."""
    out = {"empty_ids": tokenizer.plain([""])}
    if tokenizer.tokenizer_2 is not None:
        out["empty_ids_2"] = tokenizer.plain([""], tower=2)
    return out


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
    keys: jax.Array,
    guidance: jax.Array,
    gamma: jax.Array,
    sigma: jax.Array,
    alpha: jax.Array,
    init_latents: jax.Array | None = None,
    input_ids_2: jax.Array | None = None,
    empty_ids_2: jax.Array | None = None,
    time_ids: jax.Array | None = None,
) -> jax.Array:
    """DDIM from ``noise`` (B, h, w, c) to clean latents; words/image tokens (1, ...) or (B, ...).

    ``keys`` (B,): with eta > 0, row b's variance noise at step i is
    ``normal(step_keys(keys, steps)[i, b], noise.shape[1:])``. ``init_latents`` (scaled, 1 or B
    rows) with ``spec.strength`` < 1: img2img from those latents noised to the first step run.
    SDXL: ``input_ids_2`` / ``empty_ids_2`` (tokenizer 2's ids) and ``time_ids`` (1 or B rows;
    default: the image size, uncropped); with ``force_zeros_for_empty_prompt`` the
    unconditional text input is zeros (context and pooled), as diffusers' SDXL pipeline.
    """
    b = noise.shape[0]
    words = jnp.broadcast_to(words, (b, *words.shape[1:]))
    image_tokens = jnp.broadcast_to(image_tokens, (b, *image_tokens.shape[1:]))
    cond = model.encode_text(input_ids, slots, words, input_ids_2)
    if model.is_xl:
        if time_ids is None:
            time_ids = default_time_ids(b, noise.shape[1:3], model.latent_factor)
        time_ids = jnp.broadcast_to(time_ids, (b, 6))
    if spec.cfg:
        if model.force_zeros_for_empty_prompt:
            uncond = cond.zeros_like()
        else:
            uncond = model.encode_plain(empty_ids, empty_ids_2)
        text = jax.tree.map(
            lambda u, c: jnp.concatenate([jnp.broadcast_to(u, c.shape), c]), uncond, cond
        )
        if time_ids is not None:
            time_ids = jnp.concatenate([time_ids, time_ids])
        tokens = jnp.concatenate([image_tokens, image_tokens])
        u_gamma, u_alpha = (1.0, 0.0) if spec.uncond == "base" else (gamma + sigma, alpha)
        gammas = jnp.concatenate([jnp.full((b,), u_gamma), jnp.full((b,), gamma)])
        sigmas = jnp.concatenate([jnp.zeros((b,)), jnp.full((b,), sigma)])
        alphas = jnp.concatenate([jnp.full((b,), u_alpha), jnp.full((b,), alpha)])
    else:
        text, tokens = cond, image_tokens
        gammas, sigmas, alphas = jnp.full((b,), gamma), jnp.full((b,), sigma), alpha

    ts = ddim_timesteps(schedule, spec.steps)
    prev = ddim_prev_timesteps(schedule, ts)
    per_step = step_keys(keys, spec.steps)
    start = spec.start
    x = noise
    if init_latents is not None:
        init = jnp.broadcast_to(init_latents, noise.shape)
        x = add_noise(schedule, init, noise, jnp.full((b,), ts[start]))

    def predict(x_in: jax.Array, t: jax.Array) -> jax.Array:
        return model.denoise(
            x_in, t, text, tokens, gamma=gammas, sigma=sigmas, alpha=alphas, time_ids=time_ids
        )

    return ddim_loop(
        schedule,
        predict,
        x,
        ts[start:],
        prev[start:],
        guidance=guidance,
        cfg=spec.cfg,
        eta=spec.eta,
        step_keys=per_step[start:],
    )


class Sampler:
    """A compiled PhotoVerse sampler over a fixed model: call it with references, prompts and
    knobs; it compiles once per shape and spec (ahead of time, so compile and run time are
    measured apart: ``last_compile_s``).

    Safe to call from several threads (a server's concurrent requests): a new shape compiles
    once, the other callers of that shape wait for it, and ``last_compile_s`` /
    ``last_compiled`` describe the calling thread's own last call.
    """

    def __init__(self, model: PhotoVerse, schedule: NoiseSchedule):
        self.graphdef, self.state = nnx.split(model)
        self.schedule = schedule
        self.traces = 0  # how many times the loop was compiled (tests, diagnostics)
        self._jitted = jax.jit(self._run, static_argnames=("spec", "num_words", "decode"))
        self._compiled: dict = {}
        self._compiling: dict = {}  # signature -> the lock its one compilation holds
        self._lock = threading.Lock()  # guards the two dicts and ``traces``
        self._last = threading.local()  # per thread: compile time and programs of its last call

    @property
    def last_compile_s(self) -> float:
        """Compile time of this thread's last call (0 when it reused a compilation)."""
        return getattr(self._last, "compile_s", 0.0)

    @property
    def last_compiled(self) -> int:
        """Programs this thread's last call compiled (0 or 1)."""
        return getattr(self._last, "compiled", 0)

    def _run(
        self,
        state,
        refs,
        descriptors,
        input_ids,
        slots,
        empty_ids,
        noise,
        keys,
        knobs,
        init_images,
        xl,
        *,
        spec,
        num_words,
        decode,
    ):
        model = nnx.merge(self.graphdef, state)
        words, tokens = encode_references(model, refs, num_words, descriptors)
        init_latents = None
        if init_images is not None:
            mean, _ = model.vae.encode(init_images * 2.0 - 1.0)  # the posterior mean
            init_latents = model.vae.scale_latents(mean)
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
            keys=keys,
            init_latents=init_latents,
            **xl,
            **knobs,
        )
        if not decode:
            return latents
        return model.vae.decode_images(latents)

    def _executable(self, args: tuple, statics: dict):
        leaves, treedef = jax.tree.flatten(args)
        signature = (
            treedef,
            tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
            tuple(sorted(statics.items())),
        )
        self._last.compile_s, self._last.compiled = 0.0, 0
        with self._lock:
            if signature in self._compiled:
                return self._compiled[signature]
            shape_lock = self._compiling.setdefault(signature, threading.Lock())
        with shape_lock:  # one compilation per shape; other shapes compile meanwhile
            if signature not in self._compiled:
                t0 = time.perf_counter()
                executable = self._jitted.lower(*args, **statics).compile()
                release_freed_memory()  # the compiler's freed working memory
                self._last.compile_s, self._last.compiled = time.perf_counter() - t0, 1
                with self._lock:
                    self._compiled[signature] = executable
                    self._compiling.pop(signature, None)
                    self.traces += 1
        return self._compiled[signature]

    def __call__(
        self,
        refs: np.ndarray,
        input_ids: np.ndarray,
        slots: np.ndarray,
        empty_ids: np.ndarray,
        noise: jax.Array,
        key: jax.Array,
        *,
        descriptors: np.ndarray | None = None,
        num_words: int,
        guidance: float = 7.5,
        gamma: float = 1.0,
        sigma: float = 1.0,
        alpha: float = 1.0,
        spec: SamplerSpec = SamplerSpec(),
        init_images: np.ndarray | None = None,
        decode: bool = True,
        state: nnx.State | None = None,
        input_ids_2: np.ndarray | None = None,
        empty_ids_2: np.ndarray | None = None,
        time_ids: np.ndarray | None = None,
    ) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] (or latents with ``decode=False``).

        ``noise`` (B, h, w, c) is the start latent; ``key`` one key (split over the rows) or (B,)
        keys, one per row (eta noise). ``init_images`` (1 or B, H, W, 3) in [0, 1] with
        ``spec.strength`` < 1: img2img. ``state``: other weights for the same model (e.g. the
        current ones during training); the compilation is reused. ``descriptors`` (R, 128):
        the references' dlib descriptors, for a model whose image branch reads identity tokens.
        SDXL: ``input_ids_2`` /
        ``empty_ids_2`` (tokenizer 2) and optional ``time_ids`` (1 or B, 6).
        """
        if init_images is None and spec.strength < 1.0:
            raise ValueError(f"spec.strength {spec.strength} (img2img) needs init_images")
        b = noise.shape[0]
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
        if key.ndim == 0:
            key = jax.random.split(key, b)
        knobs = {
            k: jnp.asarray(v, jnp.float32)
            for k, v in dict(guidance=guidance, gamma=gamma, sigma=sigma, alpha=alpha).items()
        }
        args = (
            self.state if state is None else state,
            jnp.asarray(refs),
            None if descriptors is None else jnp.asarray(descriptors, jnp.float32),
            jnp.asarray(input_ids),
            jnp.asarray(slots),
            jnp.asarray(empty_ids),
            jnp.asarray(noise),
            key,
            knobs,
            None if init_images is None else jnp.asarray(init_images, jnp.float32),
            {
                k: jnp.asarray(v)
                for k, v in dict(
                    input_ids_2=input_ids_2, empty_ids_2=empty_ids_2, time_ids=time_ids
                ).items()
                if v is not None
            },
        )
        statics = dict(spec=spec, num_words=num_words, decode=decode)
        return self._executable(args, statics)(*args)
