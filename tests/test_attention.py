"""Attention kernels: every registered kernel equals PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pv_jax.models.attention import available_attention, blocked_attention, get_attention

# Kernels that run on this backend (cuDNN needs a GPU and half precision).
KERNELS = [k for k in available_attention() if k != "cudnn" or jax.default_backend() == "gpu"]
# Achieved fp32 max-abs error vs torch SDPA: ~3e-7 for every kernel on CPU (and on an H100).
TOL = 1e-5
# cuDNN computes in bf16 (8 mantissa bits): inputs ~N(0, 1), outputs |x| < 1.
TOL_BF16 = 2e-2


def _qkv(lq: int, lk: int, b: int = 2, h: int = 3, d: int = 8, seed: int = 0):
    r = np.random.RandomState(seed)
    return [r.randn(b, n, h, d).astype(np.float32) for n in (lq, lk, lk)]


def _torch_sdpa(q, k, v):
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # (B, H, L, D)
    out = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v))
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("lq,lk", [(64, 77), (300, 300), (1100, 1030)])
def test_parity_attention_kernels(name, lq, lk):
    q, k, v = _qkv(lq, lk)
    got = jax.jit(get_attention(name))(q, k, v)
    chex.assert_shape(got, q.shape)
    tol = TOL_BF16 if name == "cudnn" else TOL
    np.testing.assert_allclose(np.asarray(got), _torch_sdpa(q, k, v), atol=tol, rtol=0)


@pytest.mark.parametrize("q_chunk,k_chunk", [(7, 5), (64, 128), (1000, 1000)])
def test_blocked_attention_chunk_sizes(q_chunk, k_chunk):
    q, k, v = _qkv(130, 90, seed=1)
    got = blocked_attention(q, k, v, q_chunk=q_chunk, k_chunk=k_chunk)
    np.testing.assert_allclose(np.asarray(got), _torch_sdpa(q, k, v), atol=TOL, rtol=0)


def test_blocked_attention_bf16_and_grad():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(200, 150, seed=2))
    out = blocked_attention(q, k, v, q_chunk=64, k_chunk=64)
    chex.assert_type(out, jnp.bfloat16)
    ref = get_attention("dot")(q, k, v)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max() < 2e-2
    g = jax.grad(
        lambda q: blocked_attention(q, k, v, q_chunk=64, k_chunk=64).astype(jnp.float32).sum()
    )(q.astype(jnp.float32))
    gr = jax.grad(lambda q: get_attention("dot")(q, k, v).astype(jnp.float32).sum())(
        q.astype(jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=5e-2)


def test_unknown_attention_names_the_choices():
    with pytest.raises(ValueError, match="blocked"):
        get_attention("flash9")
