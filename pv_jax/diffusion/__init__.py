"""Noise schedules, training targets and DDIM sampling steps."""

from pv_jax.diffusion.schedules import (
    NoiseSchedule,
    add_noise,
    ddim_loop,
    ddim_prev_timesteps,
    ddim_step,
    ddim_timesteps,
    predict_x0,
    rollout_x0,
    snr,
    step_keys,
    training_target,
    velocity,
)

__all__ = [
    "NoiseSchedule",
    "add_noise",
    "ddim_loop",
    "ddim_prev_timesteps",
    "ddim_step",
    "ddim_timesteps",
    "predict_x0",
    "rollout_x0",
    "snr",
    "step_keys",
    "training_target",
    "velocity",
]
