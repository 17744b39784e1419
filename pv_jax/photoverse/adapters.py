"""The two concept adapters of PhotoVerse's dual-branch extraction (SPEC.md).

- :class:`TextAdapter`: one :class:`Adapter` per chosen CLIP-vision hidden state, each turning
  that layer's CLS token (optionally with the mean patch token) into one pseudo-word S_i in the
  text encoder's width. Layers are ordered deepest first, so lowering m at inference keeps the
  deepest layers.
- :class:`ImageAdapter`: maps the tokens of one CLIP-vision hidden state to image tokens f in
  the UNet's cross-attention width.
- :class:`IdentityAdapter` [ours]: maps the reference's dlib face descriptor to N identity
  tokens in the same width, for the image branch (``PhotoVerseConfig.image_source``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.models import layers
from pv_jax.photoverse.config import DESCRIPTOR_DIM, AdapterConfig, PhotoVerseConfig


class AdapterBlock(nnx.Module):
    """Linear -> LayerNorm -> LeakyReLU."""

    def __init__(self, in_dim: int, cfg: AdapterConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear = layers.linear(in_dim, cfg.hidden, rngs=rngs, dtype=dtype)
        self.norm = layers.layer_norm(cfg.hidden, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.negative_slope = cfg.negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., hidden)."""
        return jax.nn.leaky_relu(self.norm(self.linear(x)), self.negative_slope)


class Adapter(nnx.Module):
    """``cfg.blocks`` adapter blocks, then a linear projection to ``out_dim``."""

    def __init__(
        self, in_dim: int, out_dim: int, cfg: AdapterConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        dims = [in_dim] + [cfg.hidden] * cfg.blocks
        self.blocks = nnx.List([AdapterBlock(d, cfg, dtype=dtype, rngs=rngs) for d in dims[:-1]])
        self.proj = layers.linear(
            dims[-1], out_dim, axes=(layers.MLP, layers.EMBED), rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in_dim) -> (..., out_dim) float32."""
        for block in self.blocks:
            x = block(x)
        return self.proj(x).astype(jnp.float32)


def layer_features(state: jax.Array, text_input: str) -> jax.Array:
    """The text branch's input from one hidden state (B, 1 + P, C): CLS, or CLS ++ mean patch."""
    cls = state[:, 0]
    if text_input == "cls":
        return cls
    return jnp.concatenate([cls, state[:, 1:].mean(axis=1)], axis=-1)


def image_token_features(state: jax.Array, image_tokens: str) -> jax.Array:
    """The image branch's input tokens from one hidden state (B, 1 + P, C)."""
    if image_tokens == "cls":
        return state[:, :1]
    if image_tokens == "patches":
        return state[:, 1:]
    return state


def check_vision_layers(cfg: PhotoVerseConfig, num_hidden_layers: int) -> None:
    """Every configured layer must index ``hidden_states`` (embeddings + one per layer)."""
    n = num_hidden_layers + 1
    bad = [i for i in (*cfg.text_layers, cfg.image_layer) if not -n <= i < n]
    if bad:
        raise ValueError(
            f"CLIP-vision layers {bad} do not exist: the vision tower has {n} hidden states "
            f"(indices {-n}..{n - 1}); set text_layers / image_layer in the PhotoVerse config"
        )


class TextAdapter(nnx.Module):
    """m per-layer adapters: CLIP-vision hidden states -> pseudo-words (B, m, text width)."""

    def __init__(
        self,
        cfg: PhotoVerseConfig,
        vision_width: int,
        text_width: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_dim = vision_width * (2 if cfg.text_input == "cls_mean" else 1)
        self.layer_ids = tuple(cfg.text_layers)
        self.text_input = cfg.text_input
        self.adapters = nnx.List(
            [
                Adapter(in_dim, text_width, cfg.adapter, dtype=dtype, rngs=rngs)
                for _ in self.layer_ids
            ]
        )

    def __call__(self, hidden_states: tuple[jax.Array, ...], num_words: int | None = None):
        """CLIP-vision ``hidden_states`` -> (B, m, text width); m = ``num_words`` or all."""
        m = num_words or len(self.layer_ids)
        if not 1 <= m <= len(self.layer_ids):
            raise ValueError(f"num_words must be in 1..{len(self.layer_ids)}, got {m}")
        words = [
            self.adapters[j](layer_features(hidden_states[self.layer_ids[j]], self.text_input))
            for j in range(m)
        ]
        return jnp.stack(words, axis=1)


class ImageAdapter(nnx.Module):
    """One hidden state's tokens -> image tokens f (B, T, cross-attention width)."""

    def __init__(
        self,
        cfg: PhotoVerseConfig,
        vision_width: int,
        context_width: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.layer_id = cfg.image_layer
        self.image_tokens = cfg.image_tokens
        self.adapter = Adapter(vision_width, context_width, cfg.adapter, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        """CLIP-vision ``hidden_states`` -> (B, T, context width)."""
        return self.adapter(image_token_features(hidden_states[self.layer_id], self.image_tokens))


class IdentityAdapter(nnx.Module):
    """A face descriptor (B, 128) -> N identity tokens (B, N, context width): Linear -> GELU ->
    Linear to N x width, then a LayerNorm per token (IP-Adapter-FaceID's projection). The
    descriptor is scaled to norm sqrt(128) first (unit-size entries; dlib's are about 0.1)."""

    def __init__(
        self,
        cfg: PhotoVerseConfig,
        context_width: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden = cfg.adapter.hidden
        self.num_tokens = cfg.identity_tokens
        self.width = context_width
        self.fc1 = layers.linear(DESCRIPTOR_DIM, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = layers.linear(
            hidden,
            self.num_tokens * context_width,
            axes=(layers.MLP, layers.EMBED),
            rngs=rngs,
            dtype=dtype,
        )
        self.norm = layers.layer_norm(
            context_width, cfg.adapter.layer_norm_eps, rngs=rngs, dtype=dtype
        )

    def __call__(self, descriptors: jax.Array) -> jax.Array:
        """(B, 128) dlib descriptors -> (B, N, context width) float32."""
        d = jnp.asarray(descriptors, jnp.float32)
        if d.ndim != 2 or d.shape[-1] != DESCRIPTOR_DIM:
            raise ValueError(
                f"identity tokens need dlib descriptors of shape (B, {DESCRIPTOR_DIM}), got "
                f"{d.shape}: pass each reference's FaceRecord.descriptor"
            )
        d = d * jnp.sqrt(DESCRIPTOR_DIM) / (jnp.linalg.norm(d, axis=-1, keepdims=True) + 1e-6)
        x = self.fc2(jax.nn.gelu(self.fc1(d.astype(self.fc1.kernel.dtype)), approximate=False))
        x = x.reshape(d.shape[0], self.num_tokens, self.width)
        return self.norm(x).astype(jnp.float32)
