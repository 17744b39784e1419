"""Network configs by name (tiny, and Stable Diffusion 1.5 with CLIP ViT-L/14) and a fast
random fill, for tests, demos, smoke runs and benchmarks.

The tiny configs keep every structural feature of the SD networks (cross-attention and plain
blocks, resampling, group norms) at widths that run in milliseconds on a CPU. The tiny CLIP text
tower keeps the real vocabulary and 77 positions so that the packaged tokenizer fits it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
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
TINY_UNET = UNetConfig(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
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
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
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
