"""Stable Diffusion's ``UNet2DConditionModel`` (SD 1.x, 2.x and SDXL configs) in Flax NNX, NHWC.

Mirrors diffusers' module tree and names. Cross-attention layers are built by a factory
(``cross_attention_cls``) and receive ``cross_attention_kwargs`` from the top-level call, so the
PhotoVerse conditioning (LoRA on k/v, an image key/value branch) plugs in without touching this
file.

SDXL's additions are config fields: per-block ``transformer_layers_per_block`` and
``attention_head_dim``, plain first-level blocks, and ``addition_embed_type="text_time"``: the
pooled text embedding and the size/crop time ids, embedded and added to the timestep embedding
(``text_embeds`` and ``time_ids`` of :meth:`UNet2DConditionModel.__call__`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.models import layers
from pv_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from pv_jax.models.remat import maybe_checkpoint

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

# diffusers config fields we do not implement, with the only value we accept.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "timestep_post_act": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "center_input_sample": False,
    "mid_block_only_cross_attention": None,
    "class_embeddings_concat": False,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "resnet_out_scale_factor": 1.0,
}
ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers ``unet/config.json``."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    mid_block_type: str | None = CROSS_MID
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    # SDXL: "text_time" adds an embedding of [pooled text embedding, sinusoidal time ids].
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"unsupported addition_embed_type {self.addition_embed_type!r}; "
                f"supported: {list(ADDITION_EMBED_TYPES)}"
            )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.addition_embed_type == "text_time" and self.pooled_text_dim <= 0:
            raise ValueError(
                "projection_class_embeddings_input_dim "
                f"{self.projection_class_embeddings_input_dim} leaves no room for the pooled "
                f"text embedding after the 6 time ids of addition_time_embed_dim "
                f"{self.addition_time_embed_dim} each"
            )

    @classmethod
    def from_diffusers(cls, d: dict) -> UNetConfig:
        """Build from a diffusers ``config.json`` dict; unsupported features are an error."""
        bad = {
            k: d[k]
            for k, default in _UNSUPPORTED_DEFAULTS.items()
            if k in d and d[k] != default and not (default is False and d[k] is None)
        }
        if bad:
            raise ValueError(f"unsupported UNet config settings: {bad}")
        if isinstance(d.get("cross_attention_dim"), list | tuple):
            raise ValueError("a per-block cross_attention_dim is not supported")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        if kwargs.get("upcast_attention") is None:  # SDXL's config says null
            kwargs.pop("upcast_attention", None)
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """A config dict that diffusers' ``UNet2DConditionModel`` accepts."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["_class_name"] = "UNet2DConditionModel"
        return d

    def per_block(self, value: int | Sequence[int]) -> tuple[int, ...]:
        """An int-or-list config field as one value per down block."""
        n = len(self.down_block_types)
        return (value,) * n if isinstance(value, int) else tuple(value)

    @property
    def time_ids_dim(self) -> int:
        """How many time ids per sample (SDXL: original size, crop top-left, target size: 6)."""
        if self.addition_embed_type != "text_time":
            return 0
        return 6

    @property
    def pooled_text_dim(self) -> int:
        """Width of the pooled text embedding that "text_time" expects (SDXL: 1280), else 0."""
        if self.addition_embed_type != "text_time":
            return 0
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers reads ``attention_head_dim`` as heads)."""
        return self.per_block(self.num_attention_heads or self.attention_head_dim)


def timestep_embedding(
    t: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 1e4
) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2."""

    def __init__(self, in_dim: int, dim: int, act: str, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.act = layers.activation(act)
        self.linear_1 = layers.linear(in_dim, dim, rngs=rngs, dtype=dtype)
        self.linear_2 = layers.linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, in_dim) -> (B, dim)."""
        return self.linear_2(self.act(self.linear_1(x)))


class GEGLU(nnx.Module):
    """Gated GELU projection (``ff.net.0.proj``)."""

    def __init__(self, dim: int, inner: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj = layers.linear(dim, inner * 2, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., dim) -> (..., inner)."""
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """GEGLU -> (dropout) -> linear, named ``net.0`` and ``net.2`` as in diffusers."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: jnp.dtype, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List(
            [
                GEGLU(dim, inner, dtype=dtype, rngs=rngs),
                None,  # dropout in diffusers; no parameters
                layers.linear(inner, dim, axes=(layers.MLP, layers.EMBED), rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., dim) -> (..., dim)."""
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and feed-forward, each pre-LayerNorm and residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        *,
        attention: str,
        cross_attention_cls: type[Attention],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.norm1 = layers.layer_norm(dim, 1e-5, rngs=rngs, dtype=dtype)
        self.attn1 = Attention(
            dim, heads=heads, dim_head=dim_head, attention=attention, dtype=dtype, rngs=rngs
        )
        self.norm2 = layers.layer_norm(dim, 1e-5, rngs=rngs, dtype=dtype)
        self.attn2 = cross_attention_cls(
            dim,
            context_dim=context_dim,
            heads=heads,
            dim_head=dim_head,
            attention=attention,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = layers.layer_norm(dim, 1e-5, rngs=rngs, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, context: jax.Array, cross_attention_kwargs: dict | None = None
    ) -> jax.Array:
        """x: (B, L, dim); context: (B, Lc, context_dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, **(cross_attention_kwargs or {}))
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in -> transformer blocks -> proj_out, residual over the image."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        *,
        num_layers: int,
        groups: int,
        use_linear_projection: bool,
        attention: str,
        cross_attention_cls: type[Attention],
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        dim_head = channels // heads
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = layers.group_norm(channels, groups, 1e-6, rngs=rngs, dtype=dtype)
        if use_linear_projection:
            self.proj_in = layers.linear(channels, inner, rngs=rngs, dtype=dtype)
            self.proj_out = layers.linear(inner, channels, rngs=rngs, dtype=dtype)
        else:
            self.proj_in = layers.conv(channels, inner, 1, rngs=rngs, dtype=dtype)
            self.proj_out = layers.conv(inner, channels, 1, rngs=rngs, dtype=dtype)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    heads,
                    dim_head,
                    context_dim,
                    attention=attention,
                    cross_attention_cls=cross_attention_cls,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array,
        cross_attention_kwargs: dict | None = None,
        *,
        remat: bool = False,
    ) -> jax.Array:
        """x: (B, H, W, C) -> same shape. ``remat``: recompute each transformer layer in the
        backward pass, in order (:mod:`pv_jax.models.remat`)."""
        b, h, w, c = x.shape
        hs = self.norm(x)
        # 1x1 conv and linear projection are the same map; only the parameter layout differs.
        hs = self.proj_in(hs).reshape(b, h * w, -1)
        layer = maybe_checkpoint(remat, lambda m, a, c, k: m(a, c, k))
        for block in self.transformer_blocks:
            hs = layer(block, hs, context, cross_attention_kwargs)
        hs = self.proj_out(hs.reshape(b, h, w, -1))
        return hs + x


class UNetBlock(nnx.Module):
    """A down, mid or up block: resnets, optional transformers, optional resampler.

    One class covers diffusers' CrossAttnDownBlock2D / DownBlock2D / CrossAttnUpBlock2D /
    UpBlock2D / UNetMidBlock2DCrossAttn; they differ only in which parts exist and in skip
    handling, which the UNet drives.
    """

    def __init__(
        self,
        resnet_channels: Sequence[tuple[int, int]],
        *,
        cross: bool,
        heads: int,
        transformer_layers: int,
        resample: str | None,
        cfg: UNetConfig,
        temb_ch: int,
        attention: str,
        cross_attention_cls: type[Attention],
        output_scale_factor: float = 1.0,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    cin,
                    cout,
                    temb_ch=temb_ch,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    act=cfg.act_fn,
                    output_scale_factor=output_scale_factor,
                    dtype=dtype,
                    rngs=rngs,
                )
                for cin, cout in resnet_channels
            ]
        )
        out_ch = resnet_channels[-1][1]
        n_attn = len(resnet_channels) if resample != "mid" else 1
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(
                        out_ch,
                        heads,
                        cfg.cross_attention_dim,
                        num_layers=transformer_layers,
                        groups=cfg.norm_num_groups,
                        use_linear_projection=cfg.use_linear_projection,
                        attention=attention,
                        cross_attention_cls=cross_attention_cls,
                        dtype=dtype,
                        rngs=rngs,
                    )
                    for _ in range(n_attn)
                ]
            )
            if cross
            else None
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_ch, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)])
            if resample == "down"
            else None
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if resample == "up" else None
        )


class UNet2DConditionModel(nnx.Module):
    """The conditional UNet: ``(sample, timesteps, context) -> noise/v prediction``, NHWC."""

    def __init__(
        self,
        config: UNetConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        attention: str = "auto",
        remat: bool = False,
        cross_attention_cls: type[Attention] = Attention,
        rngs: nnx.Rngs,
    ):
        cfg = config
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        boc = cfg.block_out_channels
        n = len(boc)
        if not (len(cfg.down_block_types) == len(cfg.up_block_types) == n):
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels differ in length"
            )
        temb_ch = boc[0] * 4
        heads = cfg.heads
        lpb = cfg.per_block(cfg.layers_per_block)
        tlpb = cfg.per_block(cfg.transformer_layers_per_block)
        common = dict(
            cfg=cfg,
            temb_ch=temb_ch,
            attention=attention,
            cross_attention_cls=cross_attention_cls,
            dtype=dtype,
            rngs=rngs,
        )

        self.conv_in = layers.conv(cfg.in_channels, boc[0], 3, rngs=rngs, dtype=dtype)
        self.time_embedding = TimestepEmbedding(boc[0], temb_ch, cfg.act_fn, dtype=dtype, rngs=rngs)
        # SDXL: [pooled text embedding, time-id embedding] -> added to the timestep embedding.
        self.add_embedding = (
            TimestepEmbedding(
                cfg.projection_class_embeddings_input_dim,
                temb_ch,
                "silu",  # diffusers' TimestepEmbedding default, whatever act_fn
                dtype=dtype,
                rngs=rngs,
            )
            if cfg.addition_embed_type == "text_time"
            else None
        )

        down = []
        out_ch = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            chans = [(in_ch if j == 0 else out_ch, out_ch) for j in range(lpb[i])]
            down.append(
                UNetBlock(
                    chans,
                    cross=_block_kind(kind, CROSS_DOWN, PLAIN_DOWN),
                    heads=heads[i],
                    transformer_layers=tlpb[i],
                    resample="down" if i < n - 1 else None,
                    **common,
                )
            )
        self.down_blocks = nnx.List(down)

        if cfg.mid_block_type not in (CROSS_MID, None):
            raise ValueError(f"unsupported mid_block_type {cfg.mid_block_type!r}")
        self.mid_block = (
            UNetBlock(
                [(boc[-1], boc[-1])] * 2,
                cross=True,
                heads=heads[-1],
                transformer_layers=tlpb[-1],
                resample="mid",
                output_scale_factor=cfg.mid_block_scale_factor,
                **common,
            )
            if cfg.mid_block_type
            else None
        )

        up = []
        rboc, rheads, rlpb, rtlpb = boc[::-1], heads[::-1], lpb[::-1], tlpb[::-1]
        out_ch = rboc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, rboc[i]
            in_ch = rboc[min(i + 1, n - 1)]
            num = rlpb[i] + 1
            chans = [
                ((prev_ch if j == 0 else out_ch) + (in_ch if j == num - 1 else out_ch), out_ch)
                for j in range(num)
            ]
            up.append(
                UNetBlock(
                    chans,
                    cross=_block_kind(kind, CROSS_UP, PLAIN_UP),
                    heads=rheads[i],
                    transformer_layers=rtlpb[i],
                    resample="up" if i < n - 1 else None,
                    **common,
                )
            )
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = layers.group_norm(
            boc[0], cfg.norm_num_groups, cfg.norm_eps, rngs=rngs, dtype=dtype
        )
        self.act = layers.activation(cfg.act_fn)
        self.conv_out = layers.conv(boc[0], cfg.out_channels, 3, rngs=rngs, dtype=dtype)

    def _added_embedding(
        self, b: int, text_embeds: jax.Array | None, time_ids: jax.Array | None
    ) -> jax.Array:
        """SDXL's "text_time" embedding (B, temb) of the pooled text and the time ids."""
        cfg = self.config
        want = {"text_embeds": (b, cfg.pooled_text_dim), "time_ids": (b, cfg.time_ids_dim)}
        for name, x in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if x is None or x.shape != want[name]:
                got = None if x is None else x.shape
                raise ValueError(
                    f"this UNet (addition_embed_type 'text_time') needs {name} of shape "
                    f"{want[name]}, got {got}"
                )
        ids = timestep_embedding(
            time_ids.reshape(-1),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(b, -1)
        added = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1)
        return self.add_embedding(added.astype(self.dtype))

    def _resnet(self, block: ResnetBlock2D, x: jax.Array, temb: jax.Array) -> jax.Array:
        return maybe_checkpoint(self.remat, lambda m, a, b: m(a, b))(block, x, temb)

    def _transformer(
        self, block: Transformer2DModel, x: jax.Array, ctx: jax.Array, kw: dict | None
    ) -> jax.Array:
        return block(x, ctx, kw, remat=self.remat)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        *,
        cross_attention_kwargs: dict | None = None,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """sample (B, H, W, C_in), timesteps () or (B,), context (B, L, D) -> (B, H, W, C_out).

        ``cross_attention_kwargs`` are passed to every cross-attention layer. SDXL
        ("text_time") also takes the pooled text embedding ``text_embeds`` (B, pooled_text_dim)
        and ``time_ids`` (B, 6): original (h, w), crop (top, left), target (h, w).
        """
        cfg = self.config
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(
            timesteps,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        temb = self.time_embedding(temb.astype(self.dtype))
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(b, text_embeds, time_ids)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError(
                "text_embeds/time_ids were given, but this UNet has no addition_embed_type"
            )
        ctx = encoder_hidden_states.astype(self.dtype)
        kw = cross_attention_kwargs

        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._resnet(resnet, x, temb)
                if block.attentions is not None:
                    x = self._transformer(block.attentions[j], x, ctx, kw)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)

        if self.mid_block is not None:
            x = self._resnet(self.mid_block.resnets[0], x, temb)
            x = self._transformer(self.mid_block.attentions[0], x, ctx, kw)
            x = self._resnet(self.mid_block.resnets[1], x, temb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = self._resnet(resnet, x, temb)
                if block.attentions is not None:
                    x = self._transformer(block.attentions[j], x, ctx, kw)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)

        x = self.conv_out(self.act(self.conv_norm_out(x)))
        return x.astype(jnp.float32)


def _block_kind(kind: str, cross: str, plain: str) -> bool:
    if kind not in (cross, plain):
        raise ValueError(f"unsupported block type {kind!r}; expected {cross!r} or {plain!r}")
    return kind == cross
