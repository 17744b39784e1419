"""The PhotoVerse model: the SD networks, the CLIP image encoder, the face net and the adapters.

:class:`PhotoVerse` holds every network as one NNX module, so that a train step splits it once
into the trainable part (adapters, LoRA factors, W_k^S / W_v^S) and the frozen rest:

    graphdef, trainable, frozen = split_trainable(model)

Building it (from weight folders or random presets) is ``factory.py``'s job.

On SDXL (a second text tower, ``text_encoder_2``) the pseudo-words have both towers' widths
(768 + 1280, split before each tower), the context is SDXL's concatenated penultimate states,
the pooled embedding follows from tower 2 as usual, and the UNet also takes the time ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pv_jax.face import FaceResNet
from pv_jax.models.clip import (
    CLIPTextModel,
    CLIPVisionModel,
    encode_prompt_states,
    preprocess_images,
)
from pv_jax.models.sdxl import encode_sdxl_prompt
from pv_jax.models.unet import UNet2DConditionModel
from pv_jax.models.vae import AutoencoderKL
from pv_jax.photoverse.adapters import (
    IdentityAdapter,
    ImageAdapter,
    TextAdapter,
    check_vision_layers,
)
from pv_jax.photoverse.attention import UNET_EXTRAS, cross_attentions
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.photoverse.placeholder import encode_prompts, inject_pseudo_words

# What PhotoVerse trains: both adapters, the LoRA factors and the image branch (SPEC.md).
ADAPTER_NAMES = ("text_adapter", "image_adapter", "identity_adapter")
TRAINABLE = nnx.Any(UNET_EXTRAS, *(nnx.PathContains(n) for n in ADAPTER_NAMES))
FROZEN = nnx.All(nnx.Param, nnx.Not(TRAINABLE))
# The trainable groups, named by what a parameter's path contains (per-group learning rates,
# gradient norms per group).
TRAINABLE_GROUPS = (
    "text_adapter",
    "image_adapter",
    "identity_adapter",
    "lora",
    "to_k_s",
    "to_v_s",
)


def trainable_group(path: tuple) -> str:
    """The trainable group (``TRAINABLE_GROUPS``) of a parameter path (keys or names)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    for group in TRAINABLE_GROUPS:
        if any(group in n for n in names):
            return group
    raise ValueError(f"{'/'.join(names)} is in none of the trainable groups {TRAINABLE_GROUPS}")


@struct.dataclass
class TextConditioning:
    """What the text side gives the UNet: the context, and on SDXL the pooled embedding."""

    context: jax.Array  # (B, L, cross_attention_dim)
    pooled: jax.Array | None = None  # (B, projection_dim of text tower 2), SDXL only

    def zeros_like(self) -> TextConditioning:
        """All zeros (SDXL's unconditional input with ``force_zeros_for_empty_prompt``)."""
        return jax.tree.map(jnp.zeros_like, self)


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
        text_encoder_2: CLIPTextModel | None = None,
        force_zeros_for_empty_prompt: bool = False,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        vision_width = image_encoder.config.hidden_size
        text_widths = tuple(
            t.config.hidden_size for t in (text_encoder, text_encoder_2) if t is not None
        )
        context_width = unet.config.cross_attention_dim
        check_vision_layers(config, image_encoder.config.num_hidden_layers)
        xl_unet = unet.config.addition_embed_type == "text_time"
        if xl_unet != (text_encoder_2 is not None):
            raise ValueError(
                "an SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2 and other "
                "UNets take none: build the UNet and both text encoders from one SDXL model"
            )
        if sum(text_widths) != context_width:
            raise ValueError(
                f"the text encoders' widths {text_widths} do not add up to the UNet's "
                f"cross_attention_dim {context_width}: they must come from the same SD model"
            )
        if xl_unet and text_encoder_2.config.projection_dim != unet.config.pooled_text_dim:
            raise ValueError(
                f"text_encoder_2's projection_dim {text_encoder_2.config.projection_dim} is not "
                f"the UNet's pooled text width {unet.config.pooled_text_dim}"
            )
        if xl_unet and config.text_encoder_layer != -1:
            raise ValueError(
                f"config.text_encoder_layer={config.text_encoder_layer} is SD's choice of text "
                "hidden state; SDXL's context is each tower's penultimate state, as in diffusers: "
                "leave text_encoder_layer at -1 for an SDXL model"
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
        self.text_encoder_2 = text_encoder_2
        # SDXL base: the unconditional text input of classifier-free guidance is all zeros.
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.image_encoder = image_encoder
        self.face_net = face_net
        self.text_widths = text_widths
        self.text_adapter = TextAdapter(
            config, vision_width, sum(text_widths), dtype=dtype, rngs=rngs
        )
        # The image branch's token sources (config.image_source); absent ones are None, so a
        # checkpoint holds only what the run trains.
        self.image_adapter = (
            ImageAdapter(config, vision_width, context_width, dtype=dtype, rngs=rngs)
            if config.image_source != "identity"
            else None
        )
        self.identity_adapter = (
            IdentityAdapter(config, context_width, dtype=dtype, rngs=rngs)
            if config.uses_identity
            else None
        )

    @property
    def is_xl(self) -> bool:
        """Whether the base is SDXL (two text towers, pooled embedding and time ids)."""
        return self.text_encoder_2 is not None

    def encode_reference(
        self,
        images: jax.Array,
        num_words: int | None = None,
        descriptors: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Reference faces (B, H, W, 3), uint8 or [0, 1] -> pseudo-words (B, m, D_text) and
        image tokens f (B, T, D_context). On SDXL D_text is both towers' widths (768 + 1280).
        ``descriptors`` (B, 128): the references' dlib descriptors, needed when the image branch
        reads identity tokens (``config.image_source`` "identity" or "both"; tokens then
        follow the encoder's)."""
        pixels = preprocess_images(images, self.image_encoder.config.image_size)
        states = self.image_encoder(pixels).hidden_states
        tokens = []
        if self.image_adapter is not None:
            tokens.append(self.image_adapter(states))
        if self.identity_adapter is not None:
            if descriptors is None:
                raise ValueError(
                    f"image_source={self.config.image_source!r} reads the references' dlib "
                    "descriptors: pass descriptors (B, 128) (FaceRecord.descriptor; a training "
                    "batch's 'descriptor')"
                )
            tokens.append(self.identity_adapter(descriptors))
        return self.text_adapter(states, num_words), jnp.concatenate(tokens, axis=1)

    def encode_text(
        self,
        input_ids: jax.Array,
        slots: jax.Array,
        words: jax.Array,
        input_ids_2: jax.Array | None = None,
    ) -> TextConditioning:
        """Placeholder prompts (ids and slots from :class:`PlaceholderTokenizer`) with the
        pseudo-words ``words`` (B, m, D_text) -> the UNet's text conditioning."""
        if not self.is_xl:
            context = encode_prompts(
                self.text_encoder, input_ids, slots, words, self.config.text_encoder_layer
            )
            return TextConditioning(context)
        if input_ids_2 is None:
            raise ValueError("SDXL needs input_ids_2 (PlaceholderTokenizer with tokenizer_2)")
        w1, w2 = jnp.split(words, [self.text_widths[0]], axis=-1)
        towers = (self.text_encoder, self.text_encoder_2)
        embeds = [
            inject_pseudo_words(tower.embed_tokens(ids), slots, w)
            for tower, ids, w in zip(towers, (input_ids, input_ids_2), (w1, w2), strict=True)
        ]
        context, pooled = encode_sdxl_prompt(
            *towers, input_ids, input_ids_2, inputs_embeds=embeds[0], inputs_embeds_2=embeds[1]
        )
        return TextConditioning(context, pooled)

    def encode_plain(
        self, input_ids: jax.Array, input_ids_2: jax.Array | None = None
    ) -> TextConditioning:
        """Prompts without pseudo-words (e.g. the empty prompt of guidance) -> conditioning."""
        if not self.is_xl:
            return TextConditioning(
                encode_prompt_states(self.text_encoder, input_ids, self.config.text_encoder_layer)
            )
        if input_ids_2 is None:
            raise ValueError("SDXL needs input_ids_2 (the prompts through tokenizer_2)")
        return TextConditioning(
            *encode_sdxl_prompt(self.text_encoder, self.text_encoder_2, input_ids, input_ids_2)
        )

    def denoise(
        self,
        x_t: jax.Array,
        t: jax.Array,
        text: TextConditioning,
        image_tokens: jax.Array | None,
        *,
        gamma: float | jax.Array,
        sigma: float | jax.Array,
        alpha: float | jax.Array = 1.0,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The UNet's prediction with PhotoVerse's cross-attention knobs (scalars or (B,)).

        SDXL: ``text.pooled`` and ``time_ids`` (B, 6) (default: the latent's own size at 8x,
        uncropped: SDXL's inference default) go to the UNet's added embedding.
        """
        kwargs = dict(image_tokens=image_tokens, gamma=gamma, sigma=sigma, alpha=alpha)
        added = {}
        if self.is_xl:
            if time_ids is None:
                time_ids = default_time_ids(x_t.shape[0], x_t.shape[1:3], self.latent_factor)
            added = dict(text_embeds=text.pooled, time_ids=time_ids)
        return self.unet(x_t, t, text.context, cross_attention_kwargs=kwargs, **added)

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD's VAEs)."""
        return self.vae.config.downsample_factor

    def image_value_l1(self, image_tokens: jax.Array) -> jax.Array:
        """L_Sreg: mean |V_S| = mean |W_v^S f|, averaged over the cross-attention layers."""
        layers = cross_attentions(self.unet)
        return sum(jnp.mean(jnp.abs(a.image_values(image_tokens))) for a in layers) / len(layers)


def default_time_ids(batch: int, latent_hw: tuple[int, int], factor: int) -> jax.Array:
    """SDXL's inference time ids (B, 6): original = target = the image size, crop (0, 0)."""
    h, w = latent_hw[0] * factor, latent_hw[1] * factor
    return jnp.broadcast_to(jnp.asarray([h, w, 0, 0, h, w], jnp.float32), (batch, 6))


def split_trainable(model: PhotoVerse) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``graphdef, trainable, frozen``: the state PhotoVerse trains and the rest."""
    return nnx.split(model, TRAINABLE, ...)


def count_params(state: nnx.State) -> int:
    """Number of scalars in a state."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
