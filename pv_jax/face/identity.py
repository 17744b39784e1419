"""Identity similarity and the PhotoVerse face loss on dlib face descriptors.

``L_face = 1 - cos(F(face(x0_hat)), F(face(x)))`` (SPEC.md) with F = :class:`FaceResNet` and
face() = :func:`pv_jax.face.align.align_faces` from the target image's 5 landmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pv_jax.face.resnet import FaceResNet

_EPS = 1e-8


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine of the last axis, (..., D) x (..., D) -> (...); 0 when either vector is 0."""
    dot = jnp.sum(a * b, axis=-1)
    # One sqrt of the product keeps the gradient finite for zero vectors.
    return dot / jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), _EPS**2))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Host-side: each descriptor (last axis) scaled to unit length (float64; zeros stay 0)."""
    x = np.asarray(x, np.float64)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def descriptor_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Host-side cosine of descriptors along the last axis, (..., D) x (..., D) -> (...)
    (a float64 scalar for two vectors): the identity similarity the evaluation reports."""
    return np.sum(unit_rows(a) * unit_rows(b), axis=-1)


def identity_similarity_chips(net: FaceResNet, chips_a: jax.Array, chips_b: jax.Array) -> jax.Array:
    """Cosine of the descriptors of two batches of aligned (N, 150, 150, 3) chips -> (N,)."""
    desc = net(jnp.concatenate([chips_a, chips_b], axis=0))
    return cosine_similarity(desc[: len(chips_a)], desc[len(chips_a) :])


def identity_loss(
    desc_pred: jax.Array,
    desc_target: jax.Array,
    mask: jax.Array | None = None,
    count: jax.Array | None = None,
) -> jax.Array:
    """Mean over the masked samples of 1 - cos(pred, target); 0 when no sample is selected.

    ``mask``: (N,) bool or 0/1 (e.g. timestep t <= t_face_max and a face was found). Unselected
    samples contribute neither value nor gradient, even when their descriptors are not finite.
    ``count``: divide the masked sum by this instead of the mask's count (a microbatch's share
    of a whole batch's mean, under gradient accumulation).
    """
    if mask is None:
        return jnp.mean(1.0 - cosine_similarity(desc_pred, desc_target))
    mask = jnp.asarray(mask).astype(bool)
    # Replace unselected rows before the cosine: masking only its result would still send
    # NaN * 0 = NaN gradients through them.
    keep = mask[:, None]
    pred = jnp.where(keep, desc_pred, 1.0)
    target = jnp.where(keep, desc_target, 1.0)
    per_sample = jnp.where(mask, 1.0 - cosine_similarity(pred, target), 0.0)
    return jnp.sum(per_sample) / jnp.maximum(jnp.sum(mask) if count is None else count, 1)
