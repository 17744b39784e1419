"""Noise schedules (DDPM training side) and DDIM sampling steps, as pure jittable functions.

Matches diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (betas computed in float32 as diffusers
does; the same timestep spacings; the same DDIM update including eta and clipping).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: a float32 step, one rounding of start + step * i
    (counted back from the end for the second half). numpy's linspace differs by 1 ulp."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    out = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return out.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's CPU cumprod of float32 (float64 accumulator, float32 results)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _betas(kind: str, start: float, end: float, n: int) -> np.ndarray:
    if kind == "linear":
        return _linspace_f32(start, end, n)
    if kind == "scaled_linear":
        return (_linspace_f32(start**0.5, end**0.5, n) ** 2).astype(np.float32)
    if kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array(
            [min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float32
        )
    raise ValueError(
        f"unsupported beta_schedule {kind!r}; use linear, scaled_linear or squaredcos_cap_v2"
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023), as diffusers does."""
    abar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The settings of a diffusers scheduler config; arrays are derived on demand."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} not in {SPACINGS}")
        _betas(self.beta_schedule, self.beta_start, self.beta_end, 2)  # validates the name

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> NoiseSchedule:
        """From a diffusers ``scheduler_config.json`` dict (unknown keys are ignored)."""
        for key in ("trained_betas", "thresholding"):
            if d.get(key):
                raise ValueError(f"scheduler setting {key}={d[key]!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_diffusers(self) -> dict[str, Any]:
        """A config dict that diffusers' ``DDIMScheduler`` accepts."""
        return dict(dataclasses.asdict(self), _class_name="DDIMScheduler")

    @property
    def betas(self) -> np.ndarray:
        """Per-step betas (float32), as diffusers computes them."""
        b = _betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        return _rescale_zero_terminal_snr(b) if self.rescale_betas_zero_snr else b

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """Cumulative products of (1 - beta) (float32)."""
        return _cumprod_f32(np.float32(1.0) - self.betas)

    @property
    def final_alpha_cumprod(self) -> float:
        """The alpha-bar DDIM uses after the last step."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


def _at(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> jax.Array:
    """alpha-bar at integer timesteps t, shaped to broadcast over an ndim-rank sample."""
    abar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(abar) x0 + sqrt(1 - abar) noise, per-sample t of shape (B,)."""
    abar = _at(schedule, t, x0.ndim)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target: sqrt(abar) noise - sqrt(1 - abar) x0."""
    abar = _at(schedule, t, x0.ndim)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar / (1 - abar) at timesteps t."""
    abar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return abar / (1.0 - abar)


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the model is trained to predict under ``schedule.prediction_type``."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def _x0_and_eps(
    prediction_type: str, out: jax.Array, x_t: jax.Array, abar: jax.Array
) -> tuple[jax.Array, jax.Array]:
    sa, sb = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return (x_t - sb * out) / sa, out
    if prediction_type == "v_prediction":
        return sa * x_t - sb * out, sa * out + sb * x_t
    return out, (x_t - sa * out) / sb


def predict_x0(
    schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> jax.Array:
    """The single-step estimate of the clean sample from a model output at timesteps t."""
    abar = _at(schedule, t, x_t.ndim)
    return _x0_and_eps(schedule.prediction_type, model_output, x_t, abar)[0]


def rollout_x0(
    schedule: NoiseSchedule,
    predict: Callable[[jax.Array, jax.Array], jax.Array],
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    steps: int,
) -> jax.Array:
    """The clean sample by a ``steps``-step deterministic DDIM rollout from x_t at per-sample
    timesteps t (B,) to 0, differentiable (PuLID's face-loss x0).

    ``model_output`` is the prediction at (x_t, t); ``predict(x, t)`` makes the later ones, at
    t_k = floor(t (steps - k) / steps), k = 1..steps-1 (``steps - 1`` more calls, each
    rematerialised in the backward pass). ``steps`` 1 is :func:`predict_x0`.
    """
    x0, eps = _x0_and_eps(schedule.prediction_type, model_output, x_t, _at(schedule, t, x_t.ndim))
    if steps == 1:
        return x0

    @jax.checkpoint
    def step(carry, k):
        x0, eps = carry
        t_k = (t * (steps - k)) // steps
        x = add_noise(schedule, x0, eps, t_k)  # the eta-0 DDIM update to t_k
        out = predict(x, t_k)
        return _x0_and_eps(schedule.prediction_type, out, x, _at(schedule, t_k, x.ndim)), None

    (x0, _), _ = jax.lax.scan(step, (x0, eps), jnp.arange(1, steps))
    return x0


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The descending timesteps of a ``num_steps`` DDIM run (diffusers' ``set_timesteps``)."""
    n = schedule.num_train_timesteps
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        ts += schedule.steps_offset
    else:  # trailing
        ratio = n / num_steps
        ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    return ts


def ddim_prev_timesteps(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """The timestep each DDIM step moves to (negative means 'final', alpha-bar = final)."""
    ratio = schedule.num_train_timesteps // len(timesteps)
    return np.asarray(timesteps) - ratio


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    t: jax.Array,
    prev_t: jax.Array,
    sample: jax.Array,
    *,
    eta: float = 0.0,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update x_t -> x_{prev_t}; returns (prev_sample, x0 prediction).

    Equals diffusers' ``DDIMScheduler.step`` (``use_clipped_model_output=False``; with eta > 0,
    ``noise`` is its ``variance_noise``). ``t``/``prev_t`` may be traced scalars.
    """
    abar_all = jnp.asarray(schedule.alphas_cumprod)
    abar = abar_all[t]
    abar_prev = jnp.where(
        prev_t >= 0, abar_all[jnp.maximum(prev_t, 0)], schedule.final_alpha_cumprod
    )
    x0, eps = _x0_and_eps(schedule.prediction_type, model_output, sample, abar)
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        x0 = jnp.clip(x0, -r, r)
    variance = (1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)
    std = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(1.0 - abar_prev - std**2) * eps
    prev = jnp.sqrt(abar_prev) * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        prev = prev + std * noise
    return prev, x0


def step_keys(keys: jax.Array, steps: int) -> jax.Array:
    """(steps, B) keys: row b's key split into one per DDIM step (its eta noise)."""
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, steps))(keys), 0, 1)


def ddim_loop(
    schedule: NoiseSchedule,
    predict: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    timesteps: np.ndarray,
    prev_timesteps: np.ndarray,
    *,
    guidance: jax.Array | float = 1.0,
    cfg: bool = False,
    eta: float = 0.0,
    step_keys: jax.Array | None = None,
) -> jax.Array:
    """DDIM from ``x`` (B, ...) through ``timesteps`` to ``prev_timesteps`` (those of
    :func:`ddim_timesteps` and :func:`ddim_prev_timesteps`, or a suffix for img2img), in one
    ``jax.lax.scan``.

    ``predict(x_in, t)`` is the model output; with ``cfg`` (classifier-free guidance) ``x_in``
    is ``[x, x]`` and the output's first half is the unconditional one, combined as
    ``uncond + guidance * (cond - uncond)``. With ``eta`` > 0, ``step_keys`` (steps, B) give
    row b's variance noise at each step (so that a row does not depend on its batch).
    """
    ts, prev = np.asarray(timesteps), np.asarray(prev_timesteps)
    if eta > 0 and step_keys is None:
        raise ValueError("ddim_loop with eta > 0 needs step_keys")
    keys = step_keys if eta > 0 else jnp.zeros((len(ts),), jnp.int32)

    def step(x, inputs):
        t, pt, k = inputs
        out = predict(jnp.concatenate([x, x]) if cfg else x, t).astype(jnp.float32)
        if cfg:
            out_uncond, out_cond = jnp.split(out, 2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        noise = None
        if eta > 0:
            noise = jax.vmap(lambda kk: jax.random.normal(kk, x.shape[1:], x.dtype))(k)
        x, _ = ddim_step(schedule, out, t, pt, x, eta=eta, noise=noise)
        return x, None

    x, _ = jax.lax.scan(step, x, (jnp.asarray(ts), jnp.asarray(prev), keys))
    return x
