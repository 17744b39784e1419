"""Network configs by name (tiny, Stable Diffusion 1.5 with CLIP ViT-L/14, SDXL with OpenCLIP
ViT-bigG/14 and ViT-H/14, and a tiny SDXL) and a fast random fill, for tests, demos, smoke runs
and benchmarks.

The tiny configs keep every structural feature of the SD networks (cross-attention and plain
blocks, resampling, group norms) at widths that run in milliseconds on a CPU. The tiny CLIP text
tower keeps the real vocabulary and 77 positions so that the packaged tokenizer fits it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from pv_jax.models.layers import abstract_module
from pv_jax.models.unet import UNetConfig
from pv_jax.models.vae import VAEConfig

TINY_TEXT = CLIPTextConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
TINY_VISION = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
# One layer per block (SD has two; tests/conftest.py's SD1 parity config keeps two): the tiny
# models' programs compile a quarter faster, and the tests compile hundreds of them.
TINY_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=64,
    norm_num_groups=8,
)
TINY_VAE = VAEConfig(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)


# Stable Diffusion 1.5 (the diffusers defaults are SD 1.5's UNet and VAE) and OpenAI CLIP
# ViT-L/14, whose text tower is SD 1.5's and whose vision tower is PhotoVerse's image encoder.
SD15_UNET = UNetConfig()
SD15_VAE = VAEConfig()
SD15_TEXT = CLIPTextConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
)
SD15_VISION = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)


# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): its UNet and VAE configs, text
# encoder 1 (OpenAI CLIP ViT-L/14's text tower, as SD 1.5's) and text encoder 2 (OpenCLIP
# ViT-bigG/14's text tower with its projection: transformers' CLIPTextModelWithProjection).
SDXL_UNET = UNetConfig(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = VAEConfig(sample_size=1024, scaling_factor=0.13025)
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = CLIPTextConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# OpenCLIP ViT-H/14's vision tower (laion2B), the image encoder of IP-Adapter for SDXL.
VIT_H14_VISION = CLIPVisionConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    projection_dim=1024,
)

# Tiny SDXL: a plain first level, 2 transformer layers in the second, per-block heads, linear
# projections, the text_time embedding; two text towers of different widths (64 and 96, gelu
# with a projection in the second) whose concatenated states are the 160-wide context.
TINY_TEXT_2 = CLIPTextConfig(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    projection_dim=48,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
# One layer per block, as TINY_UNET; the two transformer layers of the second level keep SDXL's
# transformer_layers_per_block.
TINY_SDXL_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=TINY_TEXT.hidden_size + TINY_TEXT_2.hidden_size,
    use_linear_projection=True,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + TINY_TEXT_2.projection_dim,
)
TINY_SDXL_VAE = dataclasses.replace(TINY_VAE, scaling_factor=0.13025)


def random_module(
    ctor: Callable[[nnx.Rngs], nnx.Module],
    rng: np.random.Generator,
    *,
    skip: nnx.filterlib.Filter = False,
) -> nnx.Module:
    """Build ``ctor`` abstractly and fill its parameters from numpy (scales 1, biases 0, other
    weights fan-in scaled normal); variables matching ``skip`` (default: none) stay abstract for
    the caller.

    Creating tiny modules eagerly (or under ``nnx.jit``) spends 25-40 s on hundreds of small RNG
    programs; filling from numpy takes about a second.
    """
    graphdef, state = nnx.split(abstract_module(ctor))
    skipped = nnx.filterlib.to_predicate(skip)
    for path, var in nnx.to_flat_state(state):
        if skipped(path, var):
            continue
        shape, name = var.get_value().shape, str(path[-1])
        if name == "scale":
            value = np.ones(shape, np.float32)
        elif name == "bias":
            value = np.zeros(shape, np.float32)
        else:  # kernels, embeddings, class token
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
            value = rng.standard_normal(shape).astype(np.float32) / np.sqrt(fan_in)
        var.set_value(jnp.asarray(value))
    return nnx.merge(graphdef, state)
