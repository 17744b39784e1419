"""PhotoVerse's concept injection in the UNet cross-attention (SPEC.md).

    K_T = W_k c + alpha * dW_k c,  V_T = W_v c + alpha * dW_v c     (LoRA, nnx.LoRAParam)
    K_S = W_k^S f,                 V_S = W_v^S f                    (image branch)
    O   = gamma * Attn(Q, K_T, V_T) + sigma * Attn(Q, K_S, V_S)

:class:`PhotoVerseAttention` is a drop-in ``cross_attention_cls`` for the UNet: it keeps the
base ``to_q/to_k/to_v/to_out`` (so base weights import unchanged) and adds ``lora_*`` and
``to_k_s/to_v_s``. ``image_tokens``, ``gamma``, ``sigma`` and ``alpha`` arrive through the
UNet's ``cross_attention_kwargs``; ``gamma``/``sigma``/``alpha`` are scalars or per-sample (B,).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.models import layers
from pv_jax.models.blocks import Attention
from pv_jax.photoverse.config import PhotoVerseConfig

Scalar = float | jax.Array

# Paths of the image branch's projections (trainable; not in the base SD weights).
IMAGE_BRANCH_NAMES = ("to_k_s", "to_v_s")
# Everything PhotoVerse adds to the UNet: LoRA factors and the image branch.
UNET_EXTRAS = nnx.Any(nnx.LoRAParam, *(nnx.PathContains(n) for n in IMAGE_BRANCH_NAMES))


class PhotoVerseAttention(Attention):
    """Cross-attention with LoRA on chosen projections and an image key/value branch."""

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
        lora_rank: int = 8,
        lora_targets: Sequence[str] = ("k", "v"),
        image_branch_init: str = "copy",
        rngs: nnx.Rngs,
    ):
        super().__init__(
            query_dim,
            context_dim=context_dim,
            heads=heads,
            dim_head=dim_head,
            qkv_bias=qkv_bias,
            attention=attention,
            dtype=dtype,
            rngs=rngs,
        )
        context_dim = context_dim or query_dim
        inner = heads * dim_head
        # (name, (in, out)) of each projection LoRA may adapt; a tuple, so it stays static.
        self._dims = (
            ("q", (query_dim, inner)),
            ("k", (context_dim, inner)),
            ("v", (context_dim, inner)),
            ("out", (inner, query_dim)),
        )
        self.lora_rank = lora_rank
        self.lora_targets = tuple(lora_targets) if lora_rank else ()
        self.qkv_bias = qkv_bias
        self.dtype = dtype
        self.reset_photoverse_params(rngs, image_branch_init)

    def reset_photoverse_params(self, rngs: nnx.Rngs, image_branch_init: str = "copy") -> None:
        """(Re)create the LoRA factors (A random, B zero) and W_k^S, W_v^S (copied, random, or
        "zero": W_k copied and W_v^S zero).

        Called after the base weights are loaded, so that ``"copy"`` copies the real W_k, W_v.
        """
        for name, (d_in, d_out) in self._dims:
            lora = None
            if name in self.lora_targets:
                lora = nnx.LoRA(
                    d_in,
                    self.lora_rank,
                    d_out,
                    dtype=self.dtype,
                    a_metadata=_axes(layers.EMBED, None),
                    b_metadata=_axes(None, layers.HEADS if name != "out" else layers.EMBED),
                    rngs=rngs,
                )
            setattr(self, f"lora_{name}", lora)
        d_ctx, inner = dict(self._dims)["k"]
        axes = (layers.EMBED, layers.HEADS)
        for name, base in zip(IMAGE_BRANCH_NAMES, (self.to_k, self.to_v), strict=True):
            proj = layers.linear(
                d_ctx, inner, use_bias=self.qkv_bias, axes=axes, rngs=rngs, dtype=self.dtype
            )
            if image_branch_init == "zero" and name == "to_v_s":
                proj.kernel.set_value(jnp.zeros_like(base.kernel.get_value()))
                if self.qkv_bias:
                    proj.bias.set_value(jnp.zeros_like(base.bias.get_value()))
            elif image_branch_init in ("copy", "zero"):
                # A copy, not a shared buffer: the trainable copy is donated in training.
                proj.kernel.set_value(jnp.array(base.kernel.get_value(), copy=True))
                if self.qkv_bias:
                    proj.bias.set_value(jnp.array(base.bias.get_value(), copy=True))
            setattr(self, name, proj)

    def _project(self, name: str, base: nnx.Module, x: jax.Array, alpha: Scalar) -> jax.Array:
        y = base(x)
        lora = getattr(self, f"lora_{name}")
        if lora is None:
            return y
        return y + _per_sample(alpha, y.ndim).astype(y.dtype) * lora(x).astype(y.dtype)

    def image_values(self, image_tokens: jax.Array) -> jax.Array:
        """V_S = W_v^S f (B, T, inner) (also what the L_Sreg loss regularises)."""
        return self.to_v_s(image_tokens)

    def branches(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        image_tokens: jax.Array | None = None,
        alpha: Scalar = 1.0,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The two attention outputs before gamma / sigma and the output projection: O_T over
        the text context and O_S over the image tokens (None without them), (B, Lq, inner).
        Diagnostics read them per layer with ``nnx.capture(..., method_outputs=...)``."""
        context = x if context is None else context
        q = self._project("q", self.to_q, x, alpha)
        k = self._project("k", self.to_k, context, alpha)
        v = self._project("v", self.to_v, context, alpha)
        out_t = self.attend(q, k, v)
        if image_tokens is None:
            return out_t, None
        image_tokens = image_tokens.astype(self.dtype)
        return out_t, self.attend(q, self.to_k_s(image_tokens), self.image_values(image_tokens))

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        image_tokens: jax.Array | None = None,
        gamma: Scalar = 1.0,
        sigma: Scalar = 1.0,
        alpha: Scalar = 1.0,
    ) -> jax.Array:
        """x (B, Lq, C), context c (B, Lc, C_ctx), image tokens f (B, T, C_ctx) or None:
        gamma O_T + sigma O_S through the output projection (:meth:`branches`).

        Without image tokens the image branch is skipped (as sigma = 0).
        """
        out, out_s = self.branches(x, context, image_tokens=image_tokens, alpha=alpha)
        if not _is_one(gamma):
            out = _per_sample(gamma, out.ndim).astype(out.dtype) * out
        if out_s is not None:
            out = out + _per_sample(sigma, out.ndim).astype(out.dtype) * out_s
        return self._project("out", self.to_out[0], out, alpha)


def _axes(*names: str | None) -> dict:
    return {"out_sharding": names, "eager_sharding": False}


def _is_one(v: Scalar) -> bool:
    return isinstance(v, int | float) and v == 1.0


def _per_sample(v: Scalar, ndim: int) -> jax.Array:
    """A scalar or (B,) knob shaped to broadcast over (B, ...) of rank ``ndim``."""
    v = jnp.asarray(v, jnp.float32)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def photoverse_attention_cls(cfg: PhotoVerseConfig):
    """The UNet ``cross_attention_cls`` for a PhotoVerse config."""

    def make(query_dim: int, **kwargs) -> PhotoVerseAttention:
        return PhotoVerseAttention(
            query_dim,
            lora_rank=cfg.lora_rank,
            lora_targets=cfg.lora_targets,
            image_branch_init=cfg.image_branch_init,
            **kwargs,
        )

    return make


def cross_attentions(module: nnx.Module) -> list[PhotoVerseAttention]:
    """Every PhotoVerse cross-attention layer in ``module`` (a UNet), in graph order."""
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, PhotoVerseAttention)]


def random_fusion(key: jax.Array, batch: int, cfg: PhotoVerseConfig) -> tuple[jax.Array, jax.Array]:
    """Per-sample (gamma, sigma) for training: u < low -> (max, 0), u > high -> (0, max), else
    (1, 1), with u ~ U(0, 1) (the paper's thresholds 1/3, 2/3 and max 2 by default)."""
    u = jax.random.uniform(key, (batch,))
    text_only, image_only = u < cfg.fusion_low, u > cfg.fusion_high
    gamma = jnp.where(text_only, cfg.fusion_max, jnp.where(image_only, 0.0, 1.0))
    sigma = jnp.where(image_only, cfg.fusion_max, jnp.where(text_only, 0.0, 1.0))
    return gamma, sigma
