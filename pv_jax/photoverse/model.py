"""The PhotoVerse model: the SD networks, the CLIP image encoder, the face net and the adapters.

:class:`PhotoVerse` holds every network as one NNX module, so that a train step splits it once
into the trainable part (adapters, LoRA factors, W_k^S / W_v^S) and the frozen rest:

    graphdef, trainable, frozen = split_trainable(model)

Building it (from weight folders or random presets) is ``factory.py``'s job.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.face import FaceResNet
from pv_jax.models.clip import CLIPTextModel, CLIPVisionModel, preprocess_images
from pv_jax.models.unet import UNet2DConditionModel
from pv_jax.models.vae import AutoencoderKL
from pv_jax.photoverse.adapters import ImageAdapter, TextAdapter, check_vision_layers
from pv_jax.photoverse.attention import UNET_EXTRAS, cross_attentions
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.photoverse.placeholder import encode_prompts

# What PhotoVerse trains: both adapters, the LoRA factors and the image branch (SPEC.md).
ADAPTER_NAMES = ("text_adapter", "image_adapter")
TRAINABLE = nnx.Any(UNET_EXTRAS, *(nnx.PathContains(n) for n in ADAPTER_NAMES))
FROZEN = nnx.All(nnx.Param, nnx.Not(TRAINABLE))


class PhotoVerse(nnx.Module):
    """Every network of PhotoVerse; methods are the steps a train or sample step composes."""

    def __init__(
        self,
        config: PhotoVerseConfig,
        *,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        image_encoder: CLIPVisionModel,
        face_net: FaceResNet | None = None,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        vision_width = image_encoder.config.hidden_size
        text_width = text_encoder.config.hidden_size
        context_width = unet.config.cross_attention_dim
        check_vision_layers(config, image_encoder.config.num_hidden_layers)
        if text_width != context_width:
            raise ValueError(
                f"the text encoder's width {text_width} differs from the UNet's "
                f"cross_attention_dim {context_width}: they must come from the same SD model"
            )
        if not cross_attentions(unet):
            raise ValueError(
                "the UNet has no PhotoVerse cross-attention: build it with "
                "cross_attention_cls=photoverse_attention_cls(config)"
            )
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.face_net = face_net
        self.text_adapter = TextAdapter(config, vision_width, text_width, dtype=dtype, rngs=rngs)
        self.image_adapter = ImageAdapter(
            config, vision_width, context_width, dtype=dtype, rngs=rngs
        )

    def encode_reference(
        self, images: jax.Array, num_words: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Reference faces (B, H, W, 3), uint8 or [0, 1] -> pseudo-words (B, m, D_text) and
        image tokens f (B, T, D_context)."""
        pixels = preprocess_images(images, self.image_encoder.config.image_size)
        states = self.image_encoder(pixels).hidden_states
        return self.text_adapter(states, num_words), self.image_adapter(states)

    def encode_text(self, input_ids: jax.Array, slots: jax.Array, words: jax.Array) -> jax.Array:
        """Placeholder prompts (ids and slots from :class:`PlaceholderTokenizer`) -> context."""
        return encode_prompts(
            self.text_encoder, input_ids, slots, words, self.config.text_encoder_layer
        )

    def denoise(
        self,
        x_t: jax.Array,
        t: jax.Array,
        context: jax.Array,
        image_tokens: jax.Array | None,
        *,
        gamma: float | jax.Array,
        sigma: float | jax.Array,
        alpha: float | jax.Array = 1.0,
    ) -> jax.Array:
        """The UNet's prediction with PhotoVerse's cross-attention knobs (scalars or (B,))."""
        kwargs = dict(image_tokens=image_tokens, gamma=gamma, sigma=sigma, alpha=alpha)
        return self.unet(x_t, t, context, cross_attention_kwargs=kwargs)

    def image_value_l1(self, image_tokens: jax.Array) -> jax.Array:
        """L_Sreg: mean |V_S| = mean |W_v^S f|, averaged over the cross-attention layers."""
        layers = cross_attentions(self.unet)
        return sum(jnp.mean(jnp.abs(a.image_values(image_tokens))) for a in layers) / len(layers)


def split_trainable(model: PhotoVerse) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``graphdef, trainable, frozen``: the state PhotoVerse trains and the rest."""
    return nnx.split(model, TRAINABLE, ...)


def count_params(state: nnx.State) -> int:
    """Number of scalars in a state."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
