"""SDXL's conditioning: two text towers, the pooled embedding and the size/crop time ids.

diffusers' ``StableDiffusionXLPipeline.encode_prompt`` (without ``clip_skip``):

- the UNet context is the *penultimate* hidden state of each text tower, without the final
  LayerNorm, concatenated along the width: 768 (CLIP ViT-L/14) + 1280 (OpenCLIP ViT-bigG/14);
- the pooled embedding is text tower 2's projected EOS state (``text_embeds`` of transformers'
  ``CLIPTextModelWithProjection``);
- with ``force_zeros_for_empty_prompt`` (SDXL base), the unconditional context and pooled
  embedding of classifier-free guidance are zeros, not the encoded empty prompt.

The time ids (``_get_add_time_ids``) are ``original_size + crops_coords_top_left +
target_size``, (h, w) pairs, one row of 6 per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pv_jax.models.clip import CLIPTextModel

# The hidden state SDXL takes from each text tower: the penultimate one, without final LN.
SDXL_CONTEXT_LAYER = -2


def sdxl_text_states(
    text_encoder: CLIPTextModel,
    input_ids: jax.Array,
    *,
    inputs_embeds: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """One tower's part of the SDXL context (B, L, hidden) and its pooled projected output
    (B, projection_dim), or None for a tower without projection (tower 1)."""
    out = text_encoder(input_ids, inputs_embeds=inputs_embeds)
    return out.hidden_states[SDXL_CONTEXT_LAYER], out.text_embeds


def encode_sdxl_prompt(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModel,
    input_ids: jax.Array,
    input_ids_2: jax.Array,
    *,
    inputs_embeds: jax.Array | None = None,
    inputs_embeds_2: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SDXL's UNet context (B, L, hidden + hidden_2) and pooled embedding (B, projection_dim_2).

    ``input_ids`` / ``input_ids_2``: the prompt through each tower's own tokenizer (tokenizer 2
    pads with "!"); ``inputs_embeds*`` replace the token embeddings (PhotoVerse's pseudo-words).
    """
    if not text_encoder_2.with_projection:
        raise ValueError(
            "SDXL's text encoder 2 must have its projection (transformers' "
            "CLIPTextModelWithProjection): the pooled embedding is its projected output"
        )
    states, _ = sdxl_text_states(text_encoder, input_ids, inputs_embeds=inputs_embeds)
    states_2, pooled = sdxl_text_states(text_encoder_2, input_ids_2, inputs_embeds=inputs_embeds_2)
    context = jnp.concatenate([states, states_2.astype(states.dtype)], axis=-1)
    return context, pooled


def sdxl_time_ids(
    original_size: Sequence[int] | np.ndarray,
    crop_top_left: Sequence[int] | np.ndarray,
    target_size: Sequence[int] | np.ndarray,
    batch: int | None = None,
) -> np.ndarray:
    """SDXL's micro-conditioning (B, 6) float32: original (h, w), crop (top, left), target (h, w).

    Each argument is one (h, w) pair, or (B, 2) per sample (a (1, 2) array counts as one pair);
    ``batch`` repeats single pairs and must agree with the per-sample ones.
    """
    names = ("original_size", "crop_top_left", "target_size")
    parts = [np.asarray(x, np.float32) for x in (original_size, crop_top_left, target_size)]
    for name, p in zip(names, parts, strict=True):
        if p.shape[-1:] != (2,) or p.ndim > 2:
            raise ValueError(f"{name} must be an (h, w) pair or (B, 2) pairs, got {p.shape}")
    per_sample = {n: p.shape[0] for n, p in zip(names, parts, strict=True) if p.ndim == 2}
    per_sample = {n: k for n, k in per_sample.items() if k != 1}
    if len(set(per_sample.values())) > 1:
        raise ValueError(f"per-sample pairs differ in their number of rows: {per_sample}")
    rows = next(iter(per_sample.values()), batch or 1)
    if batch is not None and batch != rows:
        raise ValueError(f"batch {batch} disagrees with {rows} per-sample rows: {per_sample}")
    return np.concatenate([np.broadcast_to(p.reshape(-1, 2), (rows, 2)) for p in parts], axis=-1)
