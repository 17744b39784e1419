"""Stable Diffusion's ``AutoencoderKL`` in Flax NNX, NHWC, with diffusers' module names."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.models import layers
from pv_jax.models.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from pv_jax.models.remat import maybe_checkpoint

_UNSUPPORTED_DEFAULTS: dict[str, Any] = {"latents_mean": None, "latents_std": None}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture fields of a diffusers ``vae/config.json``."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # Run the VAE in float32 when the model is float16 (diffusers' rule: SD 1.x and SDXL's VAEs
    # overflow in fp16; bfloat16 has fp32's range and keeps its dtype).
    force_upcast: bool = True

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """Build from a diffusers ``config.json`` dict; unsupported features are an error."""
        bad = {k: d[k] for k, v in _UNSUPPORTED_DEFAULTS.items() if d.get(k, v) != v}
        for key, want in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            if any(t != want for t in d.get(key, ())):
                bad[key] = d[key]
        if bad:
            raise ValueError(f"unsupported VAE config settings: {bad}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD's VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusers(self) -> dict:
        """A config dict that diffusers' ``AutoencoderKL`` accepts."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["_class_name"] = "AutoencoderKL"
        return d


class SpatialSelfAttention(Attention):
    """Single-head self-attention over pixels with GroupNorm and a residual (VAE mid block)."""

    def __init__(self, ch: int, *, groups: int, eps: float, attention: str, dtype, rngs: nnx.Rngs):
        super().__init__(
            ch, heads=1, dim_head=ch, qkv_bias=True, attention=attention, dtype=dtype, rngs=rngs
        )
        self.group_norm = layers.group_norm(ch, groups, eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: (B, H, W, C) -> same shape."""
        b, h, w, c = x.shape
        hs = self.group_norm(x).reshape(b, h * w, c)
        return super().__call__(hs).reshape(b, h, w, c) + x


class MidBlock(nnx.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, ch: int, cfg: VAEConfig, *, attention: str, dtype, rngs: nnx.Rngs):
        res = dict(temb_ch=None, groups=cfg.norm_num_groups, eps=1e-6, act=cfg.act_fn)
        self.resnets = nnx.List(
            [ResnetBlock2D(ch, ch, **res, dtype=dtype, rngs=rngs) for _ in range(2)]
        )
        self.attentions = (
            nnx.List(
                [
                    SpatialSelfAttention(
                        ch,
                        groups=cfg.norm_num_groups,
                        eps=1e-6,
                        attention=attention,
                        dtype=dtype,
                        rngs=rngs,
                    )
                ]
            )
            if cfg.mid_block_add_attention
            else None
        )

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        """(B, H, W, C) -> same shape; ``remat``: each part recomputed in the backward pass."""
        run = maybe_checkpoint(remat, lambda m, a: m(a))
        x = run(self.resnets[0], x)
        if self.attentions is not None:
            x = run(self.attentions[0], x)
        return run(self.resnets[1], x)


class CoderBlock(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional resampler."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_layers: int,
        cfg: VAEConfig,
        *,
        resample: str | None,
        dtype,
        rngs: nnx.Rngs,
    ):
        res = dict(temb_ch=None, groups=cfg.norm_num_groups, eps=1e-6, act=cfg.act_fn)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, **res, dtype=dtype, rngs=rngs)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_ch, padding=0, dtype=dtype, rngs=rngs)])
            if resample == "down"
            else None
        )
        self.upsamplers = (
            nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if resample == "up" else None
        )

    def __call__(self, x: jax.Array, remat: bool = False) -> jax.Array:
        """Resnets, then down- or up-sampling; ``remat``: each part recomputed in the backward
        pass."""
        run = maybe_checkpoint(remat, lambda m, a: m(a))
        for resnet in self.resnets:
            x = run(resnet, x)
        if self.downsamplers is not None:
            x = run(self.downsamplers[0], x)
        if self.upsamplers is not None:
            x = run(self.upsamplers[0], x)
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, 3) -> latent moments (B, H/8, W/8, 2 * latent_channels)."""

    def __init__(self, cfg: VAEConfig, *, attention: str, dtype, rngs: nnx.Rngs):
        boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = layers.conv(cfg.in_channels, boc[0], 3, rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List(
            [
                CoderBlock(
                    boc[max(i - 1, 0)],
                    boc[i],
                    cfg.layers_per_block,
                    cfg,
                    resample="down" if i < n - 1 else None,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(boc[-1], cfg, attention=attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = layers.group_norm(
            boc[-1], cfg.norm_num_groups, 1e-6, rngs=rngs, dtype=dtype
        )
        self.act = layers.activation(cfg.act_fn)
        self.conv_out = layers.conv(boc[-1], 2 * cfg.latent_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encode to Gaussian moments (mean and log-variance concatenated)."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (B, h, w, latent_channels) -> image (B, 8h, 8w, 3)."""

    def __init__(self, cfg: VAEConfig, *, attention: str, dtype, rngs: nnx.Rngs):
        rboc, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = layers.conv(cfg.latent_channels, rboc[0], 3, rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(rboc[0], cfg, attention=attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                CoderBlock(
                    rboc[max(i - 1, 0)],
                    rboc[i],
                    cfg.layers_per_block + 1,
                    cfg,
                    resample="up" if i < n - 1 else None,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = layers.group_norm(
            rboc[-1], cfg.norm_num_groups, 1e-6, rngs=rngs, dtype=dtype
        )
        self.act = layers.activation(cfg.act_fn)
        self.conv_out = layers.conv(rboc[-1], cfg.out_channels, 3, rngs=rngs, dtype=dtype)

    def __call__(self, z: jax.Array, remat: bool = False) -> jax.Array:
        """Decode latents to images in [-1, 1] (not clipped); ``remat``: each resnet, attention
        and upsampler recomputed in the backward pass (:mod:`pv_jax.models.remat`)."""
        x = self.mid_block(self.conv_in(z), remat)
        for block in self.up_blocks:
            x = block(x, remat)
        out = maybe_checkpoint(remat, lambda norm, conv, a: conv(self.act(norm(a))))
        return out(self.conv_norm_out, self.conv_out, x)


class AutoencoderKL(nnx.Module):
    """The KL autoencoder: ``encode`` to (mean, logvar), ``decode`` latents to images, NHWC."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        attention: str = "auto",
        upcast: bool | None = None,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        """``upcast``: compute in float32 whatever ``dtype`` (None: diffusers' rule, i.e. when
        ``config.force_upcast`` and ``dtype`` is float16). ``remat``: the decoder's blocks are
        recomputed in the backward pass (a loss on decoded images, such as the face loss)."""
        cfg = config
        self.config = cfg
        self.remat = remat
        if upcast is None:
            upcast = cfg.force_upcast and jnp.dtype(dtype) == jnp.float16
        dtype = jnp.float32 if upcast else dtype
        self.dtype = dtype
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, attention=attention, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, attention=attention, dtype=dtype, rngs=rngs)
        self.quant_conv = (
            layers.conv(2 * lc, 2 * lc, 1, rngs=rngs, dtype=dtype) if cfg.use_quant_conv else None
        )
        self.post_quant_conv = (
            layers.conv(lc, lc, 1, rngs=rngs, dtype=dtype) if cfg.use_post_quant_conv else None
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, latent)."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent) (unscaled) -> images (B, 8h, 8w, 3) in about [-1, 1]."""
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, self.remat).astype(jnp.float32)

    def sample_latents(
        self, images: jax.Array, key: jax.Array | None = None, *, noise: jax.Array | None = None
    ) -> jax.Array:
        """Scaled latents for diffusion: a draw from the posterior, times ``scaling_factor``.
        ``noise``: the standard normal draw (the mean's shape), instead of drawing it by ``key``."""
        mean, logvar = self.encode(images)
        if noise is None:
            noise = jax.random.normal(key, mean.shape, mean.dtype)
        return self.scale_latents(mean + jnp.exp(0.5 * logvar) * noise)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Raw VAE latents -> the diffusion model's latent space."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """The diffusion model's latents -> raw VAE latents (inverse of ``scale_latents``)."""
        shift = self.config.shift_factor or 0.0
        return z / self.config.scaling_factor + shift

    def decode_images(self, z: jax.Array) -> jax.Array:
        """The diffusion model's latents -> images in [0, 1] (unscaled, decoded, clipped)."""
        return jnp.clip(self.decode(self.unscale_latents(z)) / 2 + 0.5, 0.0, 1.0)
