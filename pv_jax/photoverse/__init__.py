"""PhotoVerse itself: dual-branch concept extraction, concept injection in the UNet
cross-attention, placeholder prompts, the model factory and the training objective."""

from pv_jax.photoverse.adapters import IdentityAdapter, ImageAdapter, TextAdapter
from pv_jax.photoverse.attention import (
    UNET_EXTRAS,
    PhotoVerseAttention,
    cross_attentions,
    photoverse_attention_cls,
    random_fusion,
)
from pv_jax.photoverse.config import AdapterConfig, PhotoVerseConfig
from pv_jax.photoverse.factory import (
    TINY_CONFIG,
    PhotoVerseBundle,
    Preset,
    build_bundle,
    build_photoverse,
    preset_photoverse,
    random_photoverse,
    tiny_photoverse,
)
from pv_jax.photoverse.losses import photoverse_loss
from pv_jax.photoverse.model import FROZEN, TRAINABLE, PhotoVerse, count_params, split_trainable
from pv_jax.photoverse.placeholder import (
    PlaceholderTokenizer,
    PromptError,
    PromptTokens,
    encode_prompts,
    inject_pseudo_words,
)

__all__ = [
    "FROZEN",
    "TINY_CONFIG",
    "TRAINABLE",
    "UNET_EXTRAS",
    "AdapterConfig",
    "IdentityAdapter",
    "ImageAdapter",
    "PhotoVerse",
    "PhotoVerseAttention",
    "PhotoVerseBundle",
    "Preset",
    "PhotoVerseConfig",
    "PlaceholderTokenizer",
    "PromptError",
    "PromptTokens",
    "TextAdapter",
    "build_bundle",
    "build_photoverse",
    "count_params",
    "cross_attentions",
    "encode_prompts",
    "inject_pseudo_words",
    "photoverse_attention_cls",
    "photoverse_loss",
    "preset_photoverse",
    "random_photoverse",
    "random_fusion",
    "split_trainable",
    "tiny_photoverse",
]
