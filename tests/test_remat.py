"""pv_jax.models.remat: the block's own values and gradients, with its recomputation kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.models.remat import after, checkpoint, maybe_checkpoint

# A chain of blocks whose activations (L x H floats each) dwarf their inputs (L x D).
N, L, D, H = 12, 128, 16, 2048


def _block(w, h):
    a = jax.nn.gelu(h @ w[0])
    return h + (a * jax.nn.softmax(a, axis=-1)) @ w[1]


def _chain(wrap):
    def loss(ws, h):
        for w in ws:
            h = wrap(_block)(w, h)
        return jnp.sum(h**2)

    return loss


def _weights():
    r = np.random.RandomState(0)
    return [
        (jnp.asarray(r.randn(D, H) * 0.1, jnp.float32), jnp.asarray(r.randn(H, D) * 0.01))
        for _ in range(N)
    ]


def test_checkpoint_matches_the_block_and_keeps_the_recomputation():
    ws, h = _weights(), jnp.asarray(np.random.RandomState(1).randn(L, D), jnp.float32)
    runs = {}
    for name, wrap in [("plain", lambda f: f), ("jax", jax.checkpoint), ("ours", checkpoint)]:
        step = jax.jit(jax.value_and_grad(_chain(wrap), argnums=(0, 1)))
        compiled = step.lower(ws, h).compile()
        runs[name] = (step(ws, h), compiled.memory_analysis().temp_size_in_bytes)
    (v0, g0), _ = runs["plain"]
    (v1, g1), ours_bytes = runs["ours"]
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # One block's activations are 1 MiB: all of them alive is N MiB and more. XLA's CPU compiler
    # merges jax.checkpoint's recomputation with the forward pass (its temp is the plain
    # chain's: 61 MiB); ours is recomputed block by block (6.1 MiB).
    assert runs["jax"][1] > N * L * H * 4
    assert ours_bytes * 5 < runs["jax"][1], (ours_bytes, runs["jax"][1])


def test_checkpoint_takes_modules_integers_and_python_scalars():
    lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    x = jnp.arange(6.0).reshape(2, 3)

    def fn(m, x, n, scale):
        return jnp.sum(m(x) * scale) + n

    def loss(m, x, wrap):
        return wrap(fn)(m, x, jnp.int32(2), 0.5)

    want = jax.jit(jax.grad(lambda m, x: loss(m, x, lambda f: f), argnums=(0, 1)))(lin, x)
    got = jax.jit(jax.grad(lambda m, x: loss(m, x, checkpoint), argnums=(0, 1)))(lin, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert maybe_checkpoint(False, fn) is fn


def test_after_keeps_values_and_integers():
    tree = {"f": jnp.ones(3, jnp.bfloat16), "i": jnp.arange(3), "none": None}
    out = after(tree, jnp.float32(5.0))
    assert out["f"].dtype == jnp.bfloat16 and out["i"] is tree["i"] and out["none"] is None
    np.testing.assert_array_equal(np.asarray(out["f"], np.float32), 1.0)
