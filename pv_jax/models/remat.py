"""Rematerialisation that every XLA backend keeps: a block's forward is recomputed in the
backward pass, and only once the cotangent of its output exists.

``jax.checkpoint`` saves a block's inputs and recomputes the block for its backward, and marks
the recomputation with an ``optimization_barrier`` so that XLA does not merge it with the
forward pass. XLA's CPU compiler erases those barriers before it schedules (the GPU compiler
after), and its common-subexpression elimination then merges the recomputation with the forward
computation: the forward's activations stay alive until the backward, as without remat. On the
SDXL train step at 1024 px this kept the attention probabilities of 60 transformer layers and the
decoded face image's VAE activations alive at once (docs/BENCHMARKS.md), and the step's FLOP count
left the recomputation out.

Here the backward makes the saved inputs depend on the incoming cotangent (each floating input
plus zero times one element of it) before it recomputes. The recomputation then cannot be merged
with the forward pass nor scheduled before the blocks after it have finished their backward, on
any backend, so at most one block's activations are alive at a time. The values and gradients are
the block's own; the dependence costs one elementwise pass over the block's inputs. (A NaN or inf
in that one cotangent element makes the block's gradients NaN: a step with such a cotangent has
non-finite gradients anyway, and the trainer skips it.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def after(tree: Any, anchor: jax.Array) -> Any:
    """``tree`` with every floating leaf plus ``0 * anchor``: the same values (unless ``anchor``
    is not finite), which XLA cannot compute before ``anchor`` exists."""
    zero = anchor * 0

    def tie(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        return x + zero.astype(jnp.result_type(x))

    return jax.tree.map(tie, tree)


def checkpoint(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (positional pytree arguments, NNX modules included) recomputed in the backward
    pass, after the cotangent of its output (the module docstring). NNX modules are pytrees, so
    they pass as plain arguments (``nnx.remat`` would try to write state back across trace
    levels when the caller is itself a JAX transform)."""

    @jax.custom_vjp
    def run(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        first = jax.tree.leaves(cotangent)[0]
        args = after(args, first.reshape(-1)[0].astype(jnp.float32))
        return jax.vjp(fn, *args)[1](cotangent)

    run.defvjp(forward, backward)
    return run


def maybe_checkpoint(enabled: bool, fn: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`checkpoint` of ``fn`` when ``enabled``, else ``fn`` itself."""
    return checkpoint(fn) if enabled else fn
