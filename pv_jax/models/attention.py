"""Attention kernels behind one registry, chosen by name in the model config.

All kernels take ``q (B, Lq, H, D)``, ``k, v (B, Lk, H, D)`` and return ``(B, Lq, H, D)``; scores
and softmax run in float32 whatever the input dtype (diffusers' ``upcast_attention`` behaviour
is therefore always on).

- ``dot``: plain einsum + softmax. Best for short key sequences (cross-attention, 77 tokens).
- ``blocked``: query/key chunks with an online softmax. On CPU the plain softmax over a
  4096 x 4096 score tensor is memory-bound and dominates SD's 64x64 self-attention; chunking
  keeps each score block in cache.
- ``xla``: ``jax.nn.dot_product_attention`` (XLA's fused kernel; cuDNN flash attention on GPU
  when the shapes allow, via ``cudnn``).
- ``auto``: ``blocked`` on CPU for long key sequences, ``dot`` for short ones, ``xla`` on GPU/TPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

_REGISTRY: dict[str, AttentionFn] = {}

# Key length from which "auto" uses the blocked kernel on CPU.
AUTO_BLOCKED_MIN_KEYS = 1024


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Register an attention kernel under ``name``."""

    def wrap(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_attention() -> list[str]:
    """Names accepted by :func:`get_attention`."""
    return sorted([*_REGISTRY, "auto"])


@register_attention("dot")
def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain softmax(q k^T / sqrt(d)) v with float32 scores."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, q_chunk: int = 256, k_chunk: int = 512
) -> jax.Array:
    """Exact attention over query chunks (``lax.map``) and key chunks (online softmax scan).

    Default chunks (256 queries x 512 keys) were the fastest of those tried for SD1.5's
    4096-token self-attention on a 2-core CPU (0.63 s vs 1.6 s for ``dot``; docs/BENCHMARKS.md).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    q_chunk, k_chunk = min(q_chunk, lq), min(k_chunk, lk)
    nq, nk = -(-lq // q_chunk), -(-lk // k_chunk)
    scale = 1.0 / math.sqrt(d)
    # (n, B, H, chunk, D): chunk-major so that map/scan slice the leading axis.
    qs = _pad_to(q * jnp.asarray(scale, q.dtype), 1, q_chunk)
    qs = qs.reshape(b, nq, q_chunk, h, d).transpose(1, 0, 3, 2, 4)
    ks = _pad_to(k, 1, k_chunk).reshape(b, nk, k_chunk, h, d).transpose(1, 0, 3, 2, 4)
    vs = _pad_to(v, 1, k_chunk).reshape(b, nk, k_chunk, h, d).transpose(1, 0, 3, 2, 4)
    valid = (jnp.arange(nk * k_chunk) < lk).reshape(nk, k_chunk)

    def one_query_chunk(qc: jax.Array) -> jax.Array:
        def step(carry, kv):
            m, denom, acc = carry
            kc, vc, ok = kv
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, kc, preferred_element_type=jnp.float32)
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vc.dtype), vc)
            acc = acc * corr[..., None] + pv.astype(jnp.float32)
            return (m_new, denom, acc), None

        init = (
            jnp.full((b, h, q_chunk), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, q_chunk), jnp.float32),
            jnp.zeros((b, h, q_chunk, d), jnp.float32),
        )
        if nk == 1:  # a single key block needs no running max: plain softmax
            (_, denom, acc), _ = step(init, (ks[0], vs[0], valid[0]))
        else:
            (_, denom, acc), _ = jax.lax.scan(step, init, (ks, vs, valid))
        return (acc / denom[..., None]).astype(q.dtype)

    out = jax.lax.map(one_query_chunk, qs)  # (nq, B, H, q_chunk, D)
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * q_chunk, h, d)
    return out[:, :lq]


register_attention("blocked")(blocked_attention)


@register_attention("xla")
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """XLA's fused dot-product attention (any backend)."""
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@register_attention("cudnn")
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN flash attention (GPU). cuDNN takes only fp16/bf16: fp32 inputs run in bf16."""
    dtype = q.dtype
    if dtype == jnp.float32:
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(dtype)


def _auto_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    if jax.default_backend() != "cpu":
        return xla_attention(q, k, v)
    if k.shape[1] >= AUTO_BLOCKED_MIN_KEYS:
        return blocked_attention(q, k, v)
    return dot_attention(q, k, v)


def get_attention(name: str, **options) -> AttentionFn:
    """The attention kernel called ``name`` (see module docstring), with kernel options bound."""
    if name == "auto":
        fn = _auto_attention
    elif name in _REGISTRY:
        fn = _REGISTRY[name]
    else:
        raise ValueError(f"unknown attention {name!r}; choose one of {available_attention()}")
    return functools.partial(fn, **options) if options else fn
