"""A small resumable training loop for the toy stages (VAE, base UNet, image encoder).

One jitted pure step (``params, opt_state, batch, key -> params, opt_state, metrics``) over the
``wrt`` part of an NNX module, AdamW with warm-up and cosine decay, a tqdm bar, metrics to
``<dir>/metrics.jsonl``, and the parameters and optimizer state saved to ``<dir>/state.npz``
every ``save_every`` steps: a killed stage resumes where it stopped, and a finished one
(``<dir>/done.json``) is not run again.
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
import optax
from flax import nnx
from tqdm import tqdm


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
    run under ``out``); returns the trained module and the run summary."""
    out.mkdir(parents=True, exist_ok=True)
    graphdef, params, rest = nnx.split(module, wrt, ...)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.lr,
        max(1, min(config.warmup, config.steps - 1)),
        config.steps,
        config.end_factor * config.lr,  # optax takes the final value, not a factor
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay else None
    leaves, treedef = jax.tree.flatten((params, opt_state, ema))
    state_path, done_path = out / "state.npz", out / "done.json"
    start = 0
    if state_path.is_file():
        with np.load(state_path) as f:
            start = int(f["step"])
            saved = [f[f"a{i}"] for i in range(len(leaves))]
        if [s.shape for s in saved] != [np.shape(x) for x in leaves]:
            raise ValueError(f"{state_path} was saved by another {name} config: delete {out}")
        params, opt_state, ema = jax.tree.unflatten(treedef, [jnp.asarray(s) for s in saved])
    if done_path.is_file() and start >= config.steps:
        return nnx.merge(graphdef, params if ema is None else ema, rest), json.loads(
            done_path.read_text()
        )

    def step(params, opt_state, ema, rest, batch, key):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, key)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = dict(metrics, loss=value, grad_norm=optax.tree.norm(grads))
        params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - config.ema_decay)
        return params, opt_state, ema, metrics

    jstep = jax.jit(step, donate_argnums=(0, 1, 2))
    t0, t_compile = time.perf_counter(), None
    log = (out / "metrics.jsonl").open("a")
    metrics_host: dict = {}
    with tqdm(total=config.steps, initial=start, desc=name, unit="step") as bar:
        for i in range(start, config.steps):
            rng = np.random.default_rng([config.seed, i])  # batch i is the same on a resume
            batch = make_batch(rng)
            key = jax.random.fold_in(jax.random.key(config.seed), i)
            params, opt_state, ema, metrics = jstep(params, opt_state, ema, rest, batch, key)
            if t_compile is None:
                t_compile = time.perf_counter() - t0
            if (i + 1) % config.log_every == 0 or i + 1 == config.steps:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics_host.update(step=i + 1, lr=float(schedule(i)))
                log.write(json.dumps(metrics_host) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics_host['loss']:.4f}", refresh=False)
            if (i + 1) % config.save_every == 0 or i + 1 == config.steps:
                _save(state_path, jax.tree.leaves((params, opt_state, ema)), i + 1)
                if ema is not None:
                    _save(out / f"ema_{i + 1}.npz", jax.tree.leaves(ema), i + 1)
            bar.update()
    log.close()
    seconds = time.perf_counter() - t0
    summary = {
        "stage": name,
        "steps": config.steps,
        "resumed_from": start,
        "seconds": round(seconds, 1),
        "compile_seconds": round(t_compile or 0.0, 1),
        "s_per_step": round(seconds / max(1, config.steps - start), 4),
        "final": metrics_host,
        "params": int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params))),
    }
    done_path.write_text(json.dumps(summary, indent=1))
    print(
        f"{name}: steps {start}->{config.steps} in {seconds:.0f}s "
        f"({summary['s_per_step']:.3f}s/step, compile {summary['compile_seconds']:.0f}s) | "
        f"loss {metrics_host.get('loss', float('nan')):.4f} | {summary['params']:,} params"
    )
    return nnx.merge(graphdef, params if ema is None else ema, rest), summary


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
