"""The train state, the optimizer and the pure train step ``(state, frozen, batch) -> state``.

Only the trainable part of PhotoVerse (adapters, LoRA, W_k^S / W_v^S) has optimizer state and
gradients; the frozen networks are an input of the step, never differentiated or donated. A
step whose loss or gradient norm is not finite leaves the state unchanged and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from pv_jax.diffusion import NoiseSchedule
from pv_jax.photoverse import PhotoVerseConfig, photoverse_loss
from pv_jax.photoverse.losses import (
    batch_shards,
    draw_step_noise,
    face_subset_size,
    total_loss,
)


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

        def zero():  # distinct buffers: the step donates the state
            return jnp.zeros((), jnp.int32)

        return cls(
            step=zero(),
            trainable=trainable,
            opt_state=tx.init(trainable),
            ema=jax.tree.map(jnp.copy, trainable) if ema else None,
            nan_streak=zero(),
            nan_total=zero(),
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
    grad_accum: int = 1,
) -> Callable[[TrainState, nnx.State, dict], tuple[TrainState, dict]]:
    """The pure train step; jit it with explicit shardings (``train_tpu.py``).

    ``face_sharding``: where the face loss's sub-batch lives (the batch sharding: each device
    decodes its share instead of XLA's choice, which may be every device decoding all of it).

    ``grad_accum`` = K > 1: the batch is K microbatches, run one after another in a scan inside
    the step, their fp32 gradients summed, and one update applied (:func:`accumulate_grads`):
    the same update as the whole batch at once, with a microbatch's activation memory.

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

    def grads_of(trainable, frozen, batch, key):
        if grad_accum == 1:
            return jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, key)
        return accumulate_grads(
            graphdef,
            trainable,
            frozen,
            batch,
            key,
            grad_accum,
            noise_schedule=noise_schedule,
            config=config,
            fusion=fusion,
            face_sharding=face_sharding,
        )

    def step(state: TrainState, frozen: nnx.State, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        (loss, metrics), grads = grads_of(state.trainable, frozen, batch, key)
        new_state, update_metrics = apply_gradients(
            state, tx, loss, grads, lr_schedule=lr_schedule, ema_decay=ema_decay
        )
        return new_state, dict(metrics, **update_metrics)

    return step


def apply_gradients(
    state: TrainState,
    tx: optax.GradientTransformation,
    loss: jax.Array,
    grads: nnx.State,
    *,
    lr_schedule: optax.Schedule,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer update of ``state`` from ``grads``, and its metrics: a step whose loss or
    gradient norm is not finite leaves the parameters, optimizer state and EMA unchanged and is
    counted (``nan_streak``, ``nan_total``); every model's step ends here (the toy's too)."""
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
        loss=loss,
        grad_norm=grad_norm,
        # optax counts applied updates only: skipped steps do not advance the schedule.
        learning_rate=lr_schedule(state.step - state.nan_total),
        skipped=(~ok).astype(jnp.int32),
        nan_streak=new_state.nan_streak,
        nan_total=new_state.nan_total,
    )
    return new_state, metrics


def microbatch_plan(
    t: jax.Array, k: int, subset: int, t_face_max: int
) -> tuple[jax.Array, jax.Array]:
    """How :func:`accumulate_grads` splits a batch of timesteps ``t`` (B,) into ``k``
    microbatches: ``order`` (B,), the examples of microbatch j being ``order[j * B/k :
    (j + 1) * B/k]`` (t-ranks j, j + k, j + 2k, ...), and ``face_mask`` (B,), the whole batch's
    face-loss selection (the ``subset`` smallest t, stable, of those with t <= t_face_max)."""
    by_t = jnp.argsort(t, stable=True)
    rank = jnp.argsort(by_t)
    face_mask = (rank < subset) & (t <= t_face_max)
    return by_t.reshape(-1, k).T.reshape(-1), face_mask


def accumulate_grads(
    graphdef: nnx.GraphDef,
    trainable: nnx.State,
    frozen: nnx.State,
    batch: dict,
    key: jax.Array,
    k: int,
    *,
    noise_schedule: NoiseSchedule,
    config: PhotoVerseConfig,
    fusion: bool = True,
    face_sharding: jax.sharding.Sharding | None = None,
) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """((loss, metrics), grads) of the whole batch, computed as ``k`` microbatches in a scan.

    Every per-example draw (latent, noise, timestep, fusion) is made once for the whole batch
    (:func:`draw_step_noise`), as the unaccumulated step makes it, and the face loss's
    selection too (the ``subset`` samples of smallest t, of those t <= t_face_max); its term is
    divided by the whole batch's selected count. Every other term is a mean over the examples,
    so the microbatches' terms, each weighted 1/k, add up to the whole batch's, and so do their
    gradients (summed in fp32). Microbatch j holds the examples of t-rank j, j + k, ...: each
    holds an equal share of the face-loss samples and decodes only ceil(subset / k) of them.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    b = batch["target"].shape[0]
    if b % k:
        raise ValueError(f"train.grad_accum={k} does not divide the batch of {b}")
    mb = b // k
    draws = draw_step_noise(
        model, batch, key, schedule=noise_schedule, config=config, fusion=fusion
    )
    batch = {**batch, **draws}
    t = draws["timesteps"]
    num_t = noise_schedule.num_train_timesteps
    shards = batch_shards(face_sharding, b)
    subset = face_subset_size(b, config, num_t, shards) if config.face_weight else b
    order, batch["face_mask"] = microbatch_plan(t, k, subset, config.t_face_max)
    count = jnp.sum(batch["face_mask"])
    micro_sharding = None
    if isinstance(face_sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *face_sharding.spec)
        micro_sharding = jax.sharding.NamedSharding(face_sharding.mesh, spec)

    def split(x):
        x = jnp.take(x, order, axis=0).reshape(k, mb, *x.shape[1:])
        if micro_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, micro_sharding)
        return x

    micro = jax.tree.map(split, batch)
    mb_shards = batch_shards(face_sharding, mb)
    per_micro = math.ceil(subset / k)  # microbatch j holds ceil((subset - j) / k) of them
    sub = min(mb, math.ceil(per_micro / mb_shards) * mb_shards) if config.face_weight else mb

    def micro_loss(params, frozen, m):
        _, metrics = photoverse_loss(
            nnx.merge(graphdef, params, frozen),
            m,
            key,
            schedule=noise_schedule,
            config=config,
            fusion=fusion,
            face_sharding=face_sharding,
            face_subset=sub,
            face_count=count,
        )
        # Mean terms weigh 1/k; the face term is already this microbatch's share of the sum.
        return total_loss(metrics, config, mean_weight=1.0 / k), metrics

    def body(acc, m):
        # The weights tied to this microbatch: otherwise XLA hoists their FSDP all-gathers out
        # of the loop and keeps the whole gathered model alive through the scan (+13.7 GiB per
        # chip for SDXL at 1024 px, whatever K); here they are gathered per microbatch, as the
        # unaccumulated step gathers them once.
        params, frozen_m, m = jax.lax.optimization_barrier((trainable, frozen, m))
        (share, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, frozen_m, m)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.tree.map(jnp.add, acc, (share, grads)), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    (loss, grads), rows = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    metrics = jax.tree.map(lambda v: jnp.mean(v, axis=0), rows)
    metrics["face"] = jnp.sum(rows["face"])  # each row is its share of the whole batch's
    metrics["loss"] = loss
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return (loss, metrics), grads
