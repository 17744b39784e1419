"""The toy stages' training loop (VAE, base UNet, image encoder) on the library's train step.

The step is the trainer's: ``optax`` AdamW after clipping (:func:`make_optimizer`), warm-up and
cosine decay (:func:`learning_rate_schedule`), the update, EMA and non-finite skip of
:func:`apply_gradients` on a :class:`TrainState`; metrics go through :class:`MetricWriter` to
``<dir>/metrics.jsonl``. What is the toy's own: any ``loss_fn`` over an NNX module, a
host-side ``make_batch``, and the state saved to ``<dir>/state.npz`` every ``save_every``
steps, so a killed stage resumes where it stopped and a finished one (``<dir>/done.json``) is
not run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from pv_jax.train.metrics import MetricWriter
from pv_jax.train.step import TrainState, apply_gradients, learning_rate_schedule, make_optimizer

MAX_NAN_STREAK = 10  # as the trainer's default: stop after this many non-finite steps in a row


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of one stage."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 100
    end_factor: float = 0.05  # the cosine ends at end_factor * lr
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    log_every: int = 25
    save_every: int = 250
    seed: int = 0
    # > 0: keep an exponential moving average of the parameters, return it, and write it to
    # ``<dir>/ema_<step>.npz`` at every save (the curve of a quality metric against steps).
    ema_decay: float = 0.0


def _save(path: Path, leaves: list, step: int) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, step=np.int64(step), **{f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)  # atomic: a kill never leaves half a state


def fit(
    name: str,
    module: nnx.Module,
    loss_fn: Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]],
    make_batch: Callable[[np.random.Generator], dict],
    config: FitConfig,
    out: Path,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
) -> tuple[nnx.Module, dict]:
    """Train the ``wrt`` parameters of ``module`` on ``loss_fn`` (or resume / reuse a finished
    run under ``out``); returns the trained module (its EMA when kept) and the run summary."""
    out.mkdir(parents=True, exist_ok=True)
    graphdef, params, rest = nnx.split(module, wrt, ...)
    schedule = learning_rate_schedule(
        config.lr,
        warmup_steps=min(config.warmup, config.steps - 1),
        total_steps=config.steps,
        kind="cosine",
        end_factor=config.end_factor,
    )
    tx = make_optimizer(schedule, weight_decay=config.weight_decay, clip_norm=config.clip_norm)
    state = TrainState.create(params, tx, ema=bool(config.ema_decay))
    leaves, treedef = jax.tree.flatten(state)
    state_path, done_path = out / "state.npz", out / "done.json"
    if state_path.is_file():
        with np.load(state_path) as f:
            saved = [f[f"a{i}"] for i in range(len(f.files) - 1)]
        if [s.shape for s in saved] != [np.shape(x) for x in leaves]:
            raise ValueError(f"{state_path} was saved by another {name} config: delete {out}")
        state = jax.tree.unflatten(treedef, [jnp.asarray(s) for s in saved])
    start = int(state.step)

    def trained(state: TrainState) -> nnx.Module:
        return nnx.merge(graphdef, state.trainable if state.ema is None else state.ema, rest)

    if done_path.is_file() and start >= config.steps:
        return trained(state), json.loads(done_path.read_text())

    def step(state: TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)

        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, key)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.trainable)
        state, metrics = apply_gradients(
            state, tx, value, grads, lr_schedule=schedule, ema_decay=config.ema_decay
        )
        return state, dict(aux, **metrics)

    jstep = jax.jit(step, donate_argnums=0)
    t0, t_compile = time.perf_counter(), None
    writer = MetricWriter(out, tensorboard=False)
    metrics_host: dict = {}
    with tqdm(total=config.steps, initial=start, desc=name, unit="step") as bar:
        for i in range(start, config.steps):
            rng = np.random.default_rng([config.seed, i])  # batch i is the same on a resume
            state, metrics = jstep(state, rest, make_batch(rng))
            if t_compile is None:
                t_compile = time.perf_counter() - t0
            if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                writer.write(i + 1, metrics_host)
                bar.set_postfix(loss=f"{metrics_host['loss']:.4f}", refresh=False)
                if metrics_host["nan_streak"] >= MAX_NAN_STREAK:
                    raise FloatingPointError(
                        f"{name}: {MAX_NAN_STREAK} non-finite steps in a row at step {i + 1}; "
                        f"lower FitConfig.lr or check the data (state kept at {state_path})"
                    )
            if (i + 1) % config.save_every == 0 or i + 1 == config.steps:
                _save(state_path, jax.tree.leaves(state), i + 1)
                if state.ema is not None:
                    _save(out / f"ema_{i + 1}.npz", jax.tree.leaves(state.ema), i + 1)
            bar.update()
    writer.close()
    seconds = time.perf_counter() - t0
    summary = {
        "stage": name,
        "steps": config.steps,
        "resumed_from": start,
        "seconds": round(seconds, 1),
        "compile_seconds": round(t_compile or 0.0, 1),
        "s_per_step": round(seconds / max(1, config.steps - start), 4),
        "final": metrics_host,
        "params": int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(state.trainable))),
    }
    done_path.write_text(json.dumps(summary, indent=1))
    print(
        f"{name}: steps {start}->{config.steps} in {seconds:.0f}s "
        f"({summary['s_per_step']:.3f}s/step, compile {summary['compile_seconds']:.0f}s) | "
        f"loss {metrics_host.get('loss', float('nan')):.4f} | {summary['params']:,} params"
    )
    return trained(state), summary


def load_snapshot(module: nnx.Module, path: Path, wrt: nnx.filterlib.Filter = nnx.Param):
    """``module`` with the ``wrt`` parameters of a saved snapshot (``ema_<step>.npz``; a
    snapshot stored in half precision is cast to the module's dtypes)."""
    graphdef, params, rest = nnx.split(module, wrt, ...)
    leaves, treedef = jax.tree.flatten(params)
    with np.load(path) as f:
        saved = [jnp.asarray(f[f"a{i}"], x.dtype) for i, x in enumerate(leaves)]
    if [s.shape for s in saved] != [np.shape(x) for x in leaves]:
        raise ValueError(f"{path} holds other parameters than this module's")
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, saved), rest)
