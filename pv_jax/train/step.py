"""The train state, the optimizer and the pure train step ``(state, frozen, batch) -> state``.

Only the trainable part of PhotoVerse (adapters, LoRA, W_k^S / W_v^S) has optimizer state and
gradients; the frozen networks are an input of the step, never differentiated or donated. A
step whose loss or gradient norm is not finite leaves the state unchanged and is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from pv_jax.diffusion import NoiseSchedule
from pv_jax.photoverse import PhotoVerseConfig, photoverse_loss


@struct.dataclass
class TrainState:
    """Everything a step changes (and a checkpoint saves, with the data iterator's state)."""

    step: jax.Array  # int32 scalar: updates applied or skipped so far
    trainable: nnx.State
    opt_state: Any
    ema: nnx.State | None  # exponential moving average of ``trainable`` (optional)
    nan_streak: jax.Array  # consecutive non-finite steps
    nan_total: jax.Array  # all non-finite steps

    @classmethod
    def create(cls, trainable: nnx.State, tx: optax.GradientTransformation, ema: bool):
        """A fresh state at step 0."""
        zero = jnp.zeros((), jnp.int32)
        return cls(
            step=zero,
            trainable=trainable,
            opt_state=tx.init(trainable),
            ema=jax.tree.map(jnp.copy, trainable) if ema else None,
            nan_streak=zero,
            nan_total=zero,
        )


def learning_rate_schedule(
    lr: float, *, warmup_steps: int, total_steps: int, kind: str = "constant", end_factor=0.0
) -> optax.Schedule:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``end_factor * lr``."""
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
            [warmup_steps],
        )
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), lr * end_factor
        )
    raise ValueError(f"optim.schedule={kind!r} is not one of ['constant', 'cosine']")


def scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Multiply each trainable group's updates (``trainable_group`` of the path) by its factor
    (1 for groups not named): per-group learning rates after AdamW."""
    from pv_jax.photoverse.model import TRAINABLE_GROUPS, trainable_group

    unknown = sorted(set(multipliers) - set(TRAINABLE_GROUPS))
    if unknown:
        raise ValueError(
            f"optim.lr_multipliers names unknown groups {unknown}; the groups are "
            f"{list(TRAINABLE_GROUPS)}"
        )

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * multipliers.get(trainable_group(path), 1.0), updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    lr_multipliers: dict[str, float] | None = None,
) -> optax.GradientTransformation:
    """AdamW (the paper's optimizer) after global-norm gradient clipping; ``lr_multipliers``:
    per trainable group, a factor on its learning rate (:func:`scale_by_group`)."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    if lr_multipliers:
        parts.append(scale_by_group(dict(lr_multipliers)))
    return optax.chain(*parts)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    noise_schedule: NoiseSchedule,
    config: PhotoVerseConfig,
    seed: int,
    fusion: bool = True,
    ema_decay: float = 0.0,
    face_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[TrainState, nnx.State, dict], tuple[TrainState, dict]]:
    """The pure train step; jit it with explicit shardings (``train_tpu.py``).

    ``face_sharding``: where the face loss's sub-batch lives (the batch sharding: each device
    decodes its share instead of XLA's choice, which may be every device decoding all of it).

    The step's randomness is ``fold_in(key(seed), step)``, so a resumed run draws exactly what an
    uninterrupted one would.
    """

    def loss_fn(trainable, frozen, batch, key):
        model = nnx.merge(graphdef, trainable, frozen)
        return photoverse_loss(
            model,
            batch,
            key,
            schedule=noise_schedule,
            config=config,
            fusion=fusion,
            face_sharding=face_sharding,
        )

    def step(state: TrainState, frozen: nnx.State, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.trainable, frozen, batch, key
        )
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        ema = state.ema
        if ema is not None:
            ema = keep_if_ok(optax.incremental_update(trainable, ema, 1.0 - ema_decay), ema)
        new_state = state.replace(
            step=state.step + 1,
            trainable=keep_if_ok(trainable, state.trainable),
            opt_state=keep_if_ok(opt_state, state.opt_state),
            ema=ema,
            nan_streak=jnp.where(ok, 0, state.nan_streak + 1),
            nan_total=state.nan_total + (~ok).astype(jnp.int32),
        )
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            # optax counts applied updates only: skipped steps do not advance the schedule.
            learning_rate=lr_schedule(state.step - state.nan_total),
            skipped=(~ok).astype(jnp.int32),
            nan_streak=new_state.nan_streak,
            nan_total=new_state.nan_total,
        )
        return new_state, metrics

    return step
