"""DDPM targets and DDIM steps against diffusers' DDPMScheduler / DDIMScheduler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr

from pv_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_prev_timesteps,
    ddim_step,
    ddim_timesteps,
    predict_x0,
    snr,
    training_target,
    velocity,
)

# Each of the 50 DDIM steps, fed the same input as diffusers' step, matches it to 1e-6 relative
# to the values' scale (max(1, max|x|); x0 = (x - sqrt(1-abar) eps) / sqrt(abar) reaches |x| ~ 15
# at t=981). Achieved: <= 6e-7 relative. Our betas come from numpy's linspace, 1 ulp away from
# torch's in some entries. The free-running 50-step trajectories agree to 1e-5 relative.
TOL = 1e-6
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def assert_close(got, want, tol: float = TOL) -> None:
    """Equal to ``tol`` relative to the values' scale, max(1, max|want|)."""
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got), want, atol=tol * scale, rtol=0)


def fake_model(x: np.ndarray, t: int) -> np.ndarray:
    """A fixed smooth 'model output' so both loops see the same values."""
    return np.tanh(0.7 * x + 0.001 * t).astype(np.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta,alpha_one", [(0.0, False), (0.5, True)])
def test_parity_ddim_every_step(prediction_type, spacing, eta, alpha_one):
    cfg = dict(
        SD15,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        set_alpha_to_one=alpha_one,
        steps_offset=1,
        clip_sample=False,
    )
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(50)
    ours = NoiseSchedule.from_diffusers(dict(ref.config))
    ts = ddim_timesteps(ours, 50)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    prev_ts = ddim_prev_timesteps(ours, ts)
    r = np.random.RandomState(0)
    x_ref = x_free = r.randn(1, 4, 8, 8).astype(np.float32)
    for t, pt in zip(ts, prev_ts, strict=True):
        noise = r.randn(*x_ref.shape).astype(np.float32)
        out = ref.step(
            torch.from_numpy(fake_model(x_ref, t)),
            int(t),
            torch.from_numpy(x_ref),
            eta=eta,
            variance_noise=torch.from_numpy(noise),
        )
        prev, x0 = ddim_step(
            ours, fake_model(x_ref, t), t, pt, jnp.asarray(x_ref), eta=eta, noise=noise
        )
        assert_close(x0, out.pred_original_sample.numpy())
        assert_close(prev, out.prev_sample.numpy())
        x_free, _ = ddim_step(
            ours, fake_model(np.asarray(x_free), t), t, pt, x_free, eta=eta, noise=noise
        )
        x_ref = out.prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(x_free), x_ref, rtol=1e-5, atol=1e-5)


def test_ddim_loop_jitted_scan_equals_eager():
    sched = NoiseSchedule(**SD15)
    ts = ddim_timesteps(sched, 50)
    prev = ddim_prev_timesteps(sched, ts)
    x = jnp.asarray(np.random.RandomState(1).randn(2, 8, 8, 4), jnp.float32)
    model = lambda x, t: jnp.tanh(0.7 * x + 0.001 * t)

    def eager(x):
        for t, pt in zip(ts, prev, strict=True):
            x, _ = ddim_step(sched, model(x, t), t, pt, x)
        return x

    @jax.jit
    def scanned(x):
        def body(x, tp):
            return ddim_step(sched, model(x, tp[0]), tp[0], tp[1], x)[0], None

        return jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev)))[0]

    # XLA fuses the jitted loop differently (FMA): float32 round-off only.
    np.testing.assert_allclose(np.asarray(scanned(x)), np.asarray(eager(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind", [dict(SD15), dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2")]
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parity_ddpm_training_side(kind, prediction_type):
    ref = DDPMScheduler(**kind, prediction_type=prediction_type)
    ours = NoiseSchedule.from_diffusers(dict(ref.config))
    # Betas and alpha-bars reproduce torch's float32 linspace and cumprod bit for bit.
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    r = np.random.RandomState(2)
    x0 = r.randn(3, 4, 8, 8).astype(np.float32)
    noise = r.randn(3, 4, 8, 8).astype(np.float32)
    t = np.array([0, 500, 999])
    tx, tn, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
    x_t = add_noise(ours, x0, noise, t)
    assert_close(x_t, ref.add_noise(tx, tn, tt).numpy(), tol=2 * TOL)
    assert_close(velocity(ours, x0, noise, t), ref.get_velocity(tx, tn, tt).numpy(), tol=2 * TOL)
    np.testing.assert_allclose(np.asarray(snr(ours, t)), compute_snr(ref, tt).numpy(), rtol=1e-5)
    # The x0 estimate from the exact target recovers x0 (used by the face loss); at t=999 the
    # cosine schedule's alpha-bar is ~0 and the division is ill-conditioned, so check t <= 500.
    target = training_target(ours, x0, noise, t)
    np.testing.assert_allclose(np.asarray(predict_x0(ours, target, x_t, t))[:2], x0[:2], atol=1e-4)


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(prediction_type="flow")
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(NoiseSchedule(), 0)
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_diffusers({"thresholding": True})
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(NoiseSchedule(), jnp.zeros(2), 981, 961, jnp.zeros(2), eta=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_rollout_x0_is_ddim_from_t_to_zero(prediction_type):
    """rollout_x0 with K steps from per-sample t is the eta-0 DDIM run over t, t(K-1)/K, ...,
    t/K (floored), ending with that last step's x0; 1 step is the single-step estimate."""
    from pv_jax.diffusion import rollout_x0

    sched = NoiseSchedule(**SD15, prediction_type=prediction_type)
    x_t = jnp.asarray(np.random.RandomState(2).randn(2, 4, 4, 3), jnp.float32)
    t = jnp.asarray([999, 402])
    model = lambda x, t: jnp.tanh(0.7 * x + 0.001 * t.reshape(-1, 1, 1, 1))
    first = model(x_t, t)
    one = rollout_x0(sched, model, first, x_t, t, 1)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(predict_x0(sched, first, x_t, t)))
    got = jax.jit(lambda x: rollout_x0(sched, model, model(x, t), x, t, 4))(x_t)
    for b, steps in enumerate([(999, 749, 499, 249), (402, 301, 201, 100)]):
        x = x_t[b : b + 1]
        for i, s in enumerate(steps):
            prev = steps[i + 1] if i + 1 < len(steps) else 0
            x, x0 = ddim_step(sched, model(x, jnp.asarray([s])), s, prev, x)
        np.testing.assert_allclose(np.asarray(got[b]), np.asarray(x0[0]), rtol=1e-5, atol=1e-5)
    # Differentiable through every step (each rematerialised).
    g = jax.grad(lambda x: jnp.sum(rollout_x0(sched, model, model(x, t), x, t, 4)))(x_t)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
