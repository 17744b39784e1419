"""Building blocks shared by the UNet and the VAE (diffusers' ``resnet.py`` / ``attention``).

Names mirror diffusers' module names so that weights import by rule (see ``layers.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.models import layers
from pv_jax.models.attention import get_attention


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-conv twice, with an optional time-embedding shift and 1x1 shortcut."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        temb_ch: int | None,
        groups: int,
        eps: float,
        act: str = "silu",
        output_scale_factor: float = 1.0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.act = layers.activation(act)
        self.output_scale_factor = output_scale_factor
        self.norm1 = layers.group_norm(in_ch, groups, eps, rngs=rngs, dtype=dtype)
        self.conv1 = layers.conv(in_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.time_emb_proj = (
            layers.linear(temb_ch, out_ch, rngs=rngs, dtype=dtype) if temb_ch else None
        )
        self.norm2 = layers.group_norm(out_ch, groups, eps, rngs=rngs, dtype=dtype)
        self.conv2 = layers.conv(out_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (
            layers.conv(in_ch, out_ch, 1, rngs=rngs, dtype=dtype) if in_ch != out_ch else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, C_in); temb: (B, T) or None."""
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv; ``padding=0`` pads (0, 1) on each spatial axis, as the VAE does."""

    def __init__(
        self, ch: int, *, padding: int = 1, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs
    ):
        pads = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
        self.conv = layers.conv(ch, ch, 3, stride=2, padding=pads, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Halve the spatial size."""
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = layers.conv(ch, ch, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Double the spatial size."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """Multi-head attention with diffusers' ``to_q/to_k/to_v/to_out.0`` projections.

    The steps are separate methods (:meth:`project_kv`, :meth:`attend`) so that a subclass can
    add LoRA to the key/value projections or a second key/value branch (PhotoVerse) without
    rewriting the attention.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int,
        dim_head: int,
        qkv_bias: bool = False,
        attention: str = "auto",
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        context_dim = context_dim or query_dim
        inner = heads * dim_head
        self.heads = heads
        self.attention = attention
        qkv_axes = (layers.EMBED, layers.HEADS)
        self.to_q = layers.linear(
            query_dim, inner, use_bias=qkv_bias, axes=qkv_axes, rngs=rngs, dtype=dtype
        )
        self.to_k = layers.linear(
            context_dim, inner, use_bias=qkv_bias, axes=qkv_axes, rngs=rngs, dtype=dtype
        )
        self.to_v = layers.linear(
            context_dim, inner, use_bias=qkv_bias, axes=qkv_axes, rngs=rngs, dtype=dtype
        )
        self.to_out = nnx.List(
            [
                layers.linear(
                    inner, query_dim, axes=(layers.HEADS, layers.EMBED), rngs=rngs, dtype=dtype
                )
            ]
        )

    def split_heads(self, x: jax.Array) -> jax.Array:
        """(B, L, H*D) -> (B, L, H, D)."""
        return x.reshape(*x.shape[:-1], self.heads, x.shape[-1] // self.heads)

    def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values (B, L, H*D) of the context."""
        return self.to_k(context), self.to_v(context)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """softmax(q k^T) v over heads; inputs and output (B, L, H*D)."""
        fn = get_attention(self.attention)
        out = fn(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        return out.reshape(*out.shape[:-2], -1)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (B, Lq, C); context: (B, Lk, C_ctx) or None for self-attention."""
        k, v = self.project_kv(x if context is None else context)
        return self.to_out[0](self.attend(self.to_q(x), k, v))
