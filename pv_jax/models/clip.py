"""CLIP text transformer and vision tower (transformers' ``modeling_clip``) in Flax NNX, NHWC.

Attribute names mirror transformers' module names (``encoder.layers.3.self_attn.q_proj``), so
weights import with the default rules (``pv_jax.weights.convert.CLIP_RULES`` and its prefixes).

Stable Diffusion's context: SD 1.x uses ``last_hidden_state`` of OpenAI's ViT-L/14 text encoder.
SD 2.x uses OpenCLIP's *penultimate* layer, but diffusers' SD 2 checkpoints bake that in: their
``text_encoder/config.json`` has 23 of OpenCLIP's 24 layers, and the pipeline (without
``clip_skip``) again uses ``last_hidden_state``. diffusers' ``clip_skip=k`` takes
``hidden_states[-(k + 1)]`` and applies ``final_layer_norm``; :func:`encode_prompt_states` does
the same with ``layer=-(k + 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pv_jax.models import layers
from pv_jax.models.attention import get_attention

# OpenAI CLIP's image normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers config fields we do not implement (dropout: this port only runs frozen encoders),
# with the only value we accept.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {"attention_dropout": 0.0, "dropout": 0.0}


def _hf_sub_config(d: dict, key: str, model_type: str) -> dict:
    """The text/vision part of a transformers config dict (full CLIPModel configs nest it)."""
    if key in d:
        sub = dict(d[key] or {})
        if d.get("projection_dim") is not None:
            sub["projection_dim"] = d["projection_dim"]  # CLIPModel's own projection wins
        d = sub
    if d.get("model_type", model_type) not in (model_type, "clip"):
        raise ValueError(f"expected a {model_type!r} config, got model_type {d['model_type']!r}")
    bad = {k: d[k] for k, v in _UNSUPPORTED_DEFAULTS.items() if d.get(k, v) not in (v, None)}
    if bad:
        raise ValueError(f"unsupported CLIP config settings: {bad}")
    return d


def _check_heads(hidden_size: int, num_attention_heads: int, hidden_act: str) -> None:
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size {hidden_size} is not divisible by num_attention_heads "
            f"{num_attention_heads}"
        )
    layers.activation(hidden_act)  # raises ValueError for an activation we do not have


def _from_hf(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers ``CLIPTextConfig`` (same defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_heads(self.hidden_size, self.num_attention_heads, self.hidden_act)

    @classmethod
    def from_hf(cls, d: dict) -> CLIPTextConfig:
        """Build from a transformers config dict (CLIPTextConfig, or a CLIPModel's text part)."""
        return _from_hf(cls, _hf_sub_config(d, "text_config", "clip_text_model"))

    def to_hf(self) -> dict:
        """A dict that transformers' ``CLIPTextConfig(**d)`` accepts."""
        return {**dataclasses.asdict(self), "model_type": "clip_text_model"}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The architecture fields of a transformers ``CLIPVisionConfig`` (same defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check_heads(self.hidden_size, self.num_attention_heads, self.hidden_act)

    @property
    def num_patches(self) -> int:
        """Patches per image (transformers floors a size that the patch does not divide)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, d: dict) -> CLIPVisionConfig:
        """Build from a transformers config dict (CLIPVisionConfig, or a CLIPModel's part)."""
        return _from_hf(cls, _hf_sub_config(d, "vision_config", "clip_vision_model"))

    def to_hf(self) -> dict:
        """A dict that transformers' ``CLIPVisionConfig(**d)`` accepts."""
        return {**dataclasses.asdict(self), "model_type": "clip_vision_model"}


@struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextModel`, as transformers returns them."""

    last_hidden_state: jax.Array  # (B, L, hidden), after final_layer_norm
    pooler_output: jax.Array  # (B, hidden), last_hidden_state at the EOS token
    hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer (before final LN)
    text_embeds: jax.Array | None = None  # (B, projection_dim) with_projection only


@struct.dataclass
class CLIPVisionOutput:
    """Outputs of :class:`CLIPVisionModel`, as transformers returns them."""

    last_hidden_state: jax.Array  # (B, 1 + patches, hidden), last layer (no post LN)
    pooler_output: jax.Array  # (B, hidden), post_layernorm of the CLS token
    hidden_states: tuple[jax.Array, ...]  # pre_layrnorm'd embeddings, then each layer
    image_embeds: jax.Array | None = None  # (B, projection_dim) with_projection only


def causal_dot_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax(q k^T / sqrt(d)) v with float32 scores; q/k/v (B, L, H, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _causal_xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


# The registry kernels take no mask, so the text model has its own causal ones. "auto" is the
# plain kernel: 77 tokens are too few for a fused or blocked kernel to pay off on any backend.
_CAUSAL_ATTENTION = {
    "auto": causal_dot_attention,
    "dot": causal_dot_attention,
    "xla": _causal_xla_attention,
}


def _attention_fn(name: str, causal: bool):
    if not causal:
        return get_attention(name)
    try:
        return _CAUSAL_ATTENTION[name]
    except KeyError:
        raise ValueError(
            f"attention {name!r} has no causal variant for the CLIP text model; "
            f"choose one of {sorted(_CAUSAL_ATTENTION)}"
        ) from None


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with transformers' ``q/k/v/out_proj`` names (all with bias)."""

    def __init__(
        self, hidden: int, heads: int, *, causal: bool, attention: str, dtype, rngs: nnx.Rngs
    ):
        self.heads = heads
        self.attend = _attention_fn(attention, causal)
        in_axes, out_axes = (layers.EMBED, layers.HEADS), (layers.HEADS, layers.EMBED)
        self.q_proj = layers.linear(hidden, hidden, axes=in_axes, rngs=rngs, dtype=dtype)
        self.k_proj = layers.linear(hidden, hidden, axes=in_axes, rngs=rngs, dtype=dtype)
        self.v_proj = layers.linear(hidden, hidden, axes=in_axes, rngs=rngs, dtype=dtype)
        self.out_proj = layers.linear(hidden, hidden, axes=out_axes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, L, hidden) -> (B, L, hidden)."""
        b, n, c = x.shape
        q, k, v = (
            proj(x).reshape(b, n, self.heads, c // self.heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        return self.out_proj(self.attend(q, k, v).reshape(b, n, c))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, hidden: int, inner: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = layers.activation(act)
        self.fc1 = layers.linear(hidden, inner, rngs=rngs, dtype=dtype)
        self.fc2 = layers.linear(
            inner, hidden, axes=(layers.MLP, layers.EMBED), rngs=rngs, dtype=dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, hidden) -> same shape."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(
        self, cfg: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, attention: str, dtype, rngs
    ):
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = layers.layer_norm(h, eps, rngs=rngs, dtype=dtype)
        self.self_attn = CLIPAttention(
            h, cfg.num_attention_heads, causal=causal, attention=attention, dtype=dtype, rngs=rngs
        )
        self.layer_norm2 = layers.layer_norm(h, eps, rngs=rngs, dtype=dtype)
        self.mlp = CLIPMLP(h, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, hidden) -> same shape."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers."""

    def __init__(
        self, cfg: CLIPTextConfig | CLIPVisionConfig, *, causal: bool, attention: str, dtype, rngs
    ):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(cfg, causal=causal, attention=attention, dtype=dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """The last layer's output and all hidden states (the input, then every layer's)."""
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x, tuple(states)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding (or given input embeddings) plus learned absolute positions."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.token_embedding = layers.embed(cfg.vocab_size, h, rngs=rngs, dtype=dtype)
        self.position_embedding = layers.embed(
            cfg.max_position_embeddings, h, rngs=rngs, dtype=dtype
        )

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
        """input_ids (B, L); inputs_embeds (B, L, hidden) replaces the token lookup."""
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        positions = self.position_embedding(jnp.arange(input_ids.shape[1]))
        return tokens.astype(positions.dtype) + positions


class CLIPTextModel(nnx.Module):
    """CLIP's causal text transformer (transformers' ``CLIPTextModel[WithProjection]``)."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        with_projection: bool = False,
        dtype: layers.Dtype = jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.with_projection = with_projection
        h = config.hidden_size
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, causal=True, attention=attention, dtype=dtype, rngs=rngs)
        self.final_layer_norm = layers.layer_norm(h, config.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.text_projection = (
            layers.linear(
                h,
                config.projection_dim,
                use_bias=False,
                axes=(layers.EMBED, None),
                rngs=rngs,
                dtype=dtype,
            )
            if with_projection
            else None
        )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings (B, L, hidden) without positions: edit them, pass as inputs_embeds."""
        return self.embeddings.token_embedding(input_ids)

    def eos_index(self, input_ids: jax.Array) -> jax.Array:
        """Position of the EOS token per sequence, by transformers 5's rule."""
        if self.config.eos_token_id == 2:
            # Old configs (SD 1.x, SD 2.x) carry the wrong eos id 2: transformers then takes the
            # highest id, which is EOS for CLIP's tokenizer.
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)  # the first EOS

    def __call__(
        self, input_ids: jax.Array, *, inputs_embeds: jax.Array | None = None
    ) -> CLIPTextOutput:
        """input_ids (B, L) int; inputs_embeds (B, L, hidden) replaces the token embeddings.

        The ids still choose the pooled (EOS) position when ``inputs_embeds`` is given.
        """
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {n} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        if inputs_embeds is not None and inputs_embeds.shape != (b, n, self.config.hidden_size):
            raise ValueError(
                f"inputs_embeds {inputs_embeds.shape} must be {(b, n, self.config.hidden_size)}"
            )
        x, states = self.encoder(self.embeddings(input_ids, inputs_embeds))
        last = self.final_layer_norm(x)
        pooled = last[jnp.arange(b), self.eos_index(input_ids)]
        embeds = self.text_projection(pooled) if self.text_projection is not None else None
        return CLIPTextOutput(last, pooled, states, embeds)


def encode_prompt_states(
    model: CLIPTextModel,
    input_ids: jax.Array,
    layer: int = -1,
    *,
    inputs_embeds: jax.Array | None = None,
) -> jax.Array:
    """The UNet context (B, L, hidden): ``final_layer_norm(hidden_states[layer])``.

    ``layer=-1`` is ``last_hidden_state`` (what SD 1.x and diffusers' SD 2.x use);
    ``layer=-(k + 1)`` equals diffusers' ``clip_skip=k``.
    """
    out = model(input_ids, inputs_embeds=inputs_embeds)
    if layer == -1:
        return out.last_hidden_state
    return model.final_layer_norm(out.hidden_states[layer])


class CLIPVisionEmbeddings(nnx.Module):
    """Class token + non-overlapping patch embedding (conv, no bias) + learned positions."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        h, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = layers.param(rngs, (h,), (layers.EMBED,))
        # Stride == kernel, no padding: XLA's convolution is a plain patchify-matmul here.
        self.patch_embedding = layers.conv(
            cfg.num_channels,
            h,
            p,
            stride=p,
            padding=0,
            use_bias=False,
            impl="xla",
            dtype=dtype,
            rngs=rngs,
        )
        self.position_embedding = layers.embed(cfg.num_patches + 1, h, rngs=rngs, dtype=dtype)
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, 1 + patches, hidden)."""
        patches = self.patch_embedding(pixel_values)
        b, gh, gw, h = patches.shape
        cls = jnp.broadcast_to(self.class_embedding.get_value().astype(self.dtype), (b, 1, h))
        x = jnp.concatenate([cls, patches.reshape(b, gh * gw, h)], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))


class CLIPVisionModel(nnx.Module):
    """CLIP's ViT image tower (transformers' ``CLIPVisionModel[WithProjection]``), NHWC input."""

    def __init__(
        self,
        config: CLIPVisionConfig,
        *,
        with_projection: bool = False,
        dtype: layers.Dtype = jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.with_projection = with_projection
        h, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layers.layer_norm(h, eps, rngs=rngs, dtype=dtype)  # sic
        self.encoder = CLIPEncoder(
            config, causal=False, attention=attention, dtype=dtype, rngs=rngs
        )
        self.post_layernorm = layers.layer_norm(h, eps, rngs=rngs, dtype=dtype)
        self.visual_projection = (
            layers.linear(
                h,
                config.projection_dim,
                use_bias=False,
                axes=(layers.EMBED, None),
                rngs=rngs,
                dtype=dtype,
            )
            if with_projection
            else None
        )

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """pixel_values (B, H, W, C), CLIP-normalised (see :func:`preprocess_images`)."""
        size = self.config.image_size
        if pixel_values.shape[1:3] != (size, size):
            raise ValueError(f"images must be {size}x{size}, got {pixel_values.shape[1:3]}")
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last, states = self.encoder(x)
        pooled = self.post_layernorm(last[:, 0])
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return CLIPVisionOutput(last, pooled, states, embeds)


def preprocess_images(images: jax.Array, size: int = 224) -> jax.Array:
    """CLIPImageProcessor's steps in jnp: shortest side to ``size``, center crop, normalise.

    ``images``: (B, H, W, 3), uint8 or float in [0, 1]. Returns float32 (B, size, size, 3).
    The resize is antialiased bicubic (Keys a=-0.5, as PIL's BICUBIC) in float, clipped to
    [0, 1]. PIL (used by transformers without torchvision) resizes in 8-bit fixed point and rounds
    and clips to uint8 after each of its two passes: on photo-like images the results differ by
    about one grey level (max |diff| 0.016 after normalisation, tests/test_clip.py); on white
    noise single pixels differ by up to 0.15, where PIL clips the overshoot between passes.
    """
    x = jnp.asarray(images)
    x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    b, h, w, c = x.shape
    # transformers' get_resize_output_image_size: the long side is floored.
    new_long = int(size * max(h, w) / min(h, w))
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), "bicubic", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top : top + size, left : left + size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
