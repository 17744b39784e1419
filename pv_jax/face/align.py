"""Differentiable face chips cut exactly the way ``dlib.get_face_chip`` cuts them.

dlib (``dlib/image_transforms/interpolation.h``) fits a similarity transform from five reference
points to the 5 landmarks (``get_face_chip_details``), turns it into a rotated rectangle, and
``extract_image_chips`` samples that rectangle bilinearly into a 150x150 uint8 chip. When the
rectangle is more than twice the chip's size, it first shrinks a crop of the image with
``pyramid_down<2>`` (a 5x5 [1 4 6 4 1] filter, keep every other pixel, floor to uint8) until at
most one halving is left, and samples from that level.

Here everything is pure ``jnp`` and jittable, with gradients to the image: the transform is the
closed-form least-squares similarity (what dlib's Umeyama SVD computes); the pyramid levels are
computed at full resolution with dilated ("a trous") filters, so that any crop origin dlib would
use can be read off by indexing, without data-dependent shapes; each chip's level is chosen per
sample. With ``quantize=True`` the uint8 flooring of dlib's pyramid and chips is reproduced in
the forward pass while gradients pass straight through.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# get_face_chip_details' reference positions of dlib's 5 landmarks (eye corners, nose) in a
# unit chip without padding, in the shape predictor's order.
DLIB_5POINT_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# pyramid_down<2>::point_down(p) = p / 2 - (1.25, 0.75) (x, y): dlib's rectangle bookkeeping.
_POINT_DOWN_OFFSET = np.array([1.25, 0.75])
_BINOMIAL5 = (1.0, 4.0, 6.0, 4.0, 1.0)


class ChipDetails(NamedTuple):
    """dlib's ``chip_details`` for square chips: rotation angle and rectangle in the image.

    ``rect``: (..., 4) = left, top, right, bottom of a ``drectangle`` (width = right - left + 1).
    """

    angle: jax.Array
    rect: jax.Array


def face_chip_details(landmarks5: jax.Array, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for (..., 5, 2) landmarks in (x, y) pixel coordinates."""
    lm = jnp.asarray(landmarks5, jnp.float32)
    src = jnp.asarray((padding + DLIB_5POINT_TEMPLATE) / (2 * padding + 1) * size, jnp.float32)
    # Least-squares similarity chip -> image with a proper rotation: the closed form of the
    # Umeyama estimate dlib computes by SVD (find_similarity_transform).
    a = src - src.mean(axis=0)
    b = lm - lm.mean(axis=-2, keepdims=True)
    var = jnp.sum(a * a) / a.shape[0]
    p = jnp.mean(b[..., 0] * a[:, 0] + b[..., 1] * a[:, 1], axis=-1) / var
    q = jnp.mean(b[..., 1] * a[:, 0] - b[..., 0] * a[:, 1], axis=-1) / var
    t = lm.mean(axis=-2) - jnp.stack(
        [p * src[:, 0].mean() - q * src[:, 1].mean(), q * src[:, 0].mean() + p * src[:, 1].mean()],
        axis=-1,
    )
    # chip_details(from, to, dims): angle and scale of the transform, and a rectangle of
    # size*scale pixels centred on the image of the chip point (size/2, size/2).
    scale = jnp.sqrt(p * p + q * q)
    half = size / 2.0
    cx = p * half - q * half + t[..., 0]
    cy = q * half + p * half + t[..., 1]
    r = (size * scale - 1.0) / 2.0  # centered_drect: width - 1 between left and right
    return ChipDetails(jnp.arctan2(q, p), jnp.stack([cx - r, cy - r, cx + r, cy + r], axis=-1))


def _rect_affine(angle: jax.Array, rect: jax.Array, size: int) -> jax.Array:
    """(..., 2, 3) map from chip pixels to the rectangle's frame, as extract_image_chips builds it
    (chip corners (0,0), (size-1,0), (0,size-1) -> rotated rect corners tl, tr, bl)."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    ext = (rect[..., 2] - rect[..., 0]) / (size - 1)
    cx, cy = (rect[..., 0] + rect[..., 2]) / 2, (rect[..., 1] + rect[..., 3]) / 2
    hw, hh = (rect[..., 2] - rect[..., 0]) / 2, (rect[..., 3] - rect[..., 1]) / 2
    tx = cx - c * hw + s * hh  # rotate_point(center, tl_corner, angle)
    ty = cy - s * hw - c * hh
    row0 = jnp.stack([c * ext, -s * ext, tx], axis=-1)
    row1 = jnp.stack([s * ext, c * ext, ty], axis=-1)
    return jnp.stack([row0, row1], axis=-2)


def chip_transform(landmarks5: jax.Array, size: int = 150, padding: float = 0.25) -> jax.Array:
    """(..., 2, 3) affine [A | t] with image_xy = A @ chip_xy + t, dlib's chip geometry.

    This is the map dlib samples with when no pyramid level is needed; the chip centre
    ((size-1)/2, (size-1)/2) lands on the image of the template point (size/2, size/2).
    """
    details = face_chip_details(landmarks5, size, padding)
    return _rect_affine(details.angle, details.rect, size)


def _floor_st(x: jax.Array) -> jax.Array:
    """floor() forward, identity backward (straight-through)."""
    return x + jax.lax.stop_gradient(jnp.floor(x) - x)


def _filter_dilated(x: jax.Array, dilation: int, axis: int) -> jax.Array:
    """[1 4 6 4 1] along ``axis`` with taps ``dilation`` apart, output aligned with the input."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (2 * dilation, 2 * dilation)
    xp = jnp.pad(x, pad)
    n = x.shape[axis]
    taps = [
        w * jax.lax.slice_in_dim(xp, j * dilation, j * dilation + n, axis=axis)
        for j, w in enumerate(_BINOMIAL5)
    ]
    return sum(taps[1:], taps[0])


def pyramid_stack(images: jax.Array, levels: int, quantize: bool = True) -> list[jax.Array]:
    """Full-resolution pyramid_down<2> levels: entry k (0..levels) holds, at pixel
    o + 2^k u + 2^(k+1) - 2, pixel u of level k of a pyramid built from a crop at origin o."""
    out = [images]
    for k in range(1, levels + 1):
        d = 2 ** (k - 1)
        y = _filter_dilated(_filter_dilated(out[-1], d, axis=2), d, axis=1) / 256.0
        out.append(_floor_st(y) if quantize else y)
    return out


def default_pyramid_levels(height: int, width: int, size: int = 150) -> int:
    """The most halvings a chip can need in an image this large (rect at most the image)."""
    return max(0, math.floor(math.log2(max(max(height, width) - 1, 1) / (size - 1))))


def _sample_level(
    level_img: jax.Array,
    affine: jax.Array,
    origin: jax.Array,
    level_hw: jax.Array,
    k: int,
    size: int,
) -> jax.Array:
    """Bilinear chip from full-resolution level ``k``; black outside the level image (dlib)."""
    g = jnp.arange(size, dtype=jnp.float32)
    gx, gy = g[None, :], g[:, None]
    x = affine[0, 0] * gx + affine[0, 1] * gy + affine[0, 2]
    y = affine[1, 0] * gx + affine[1, 1] * gy + affine[1, 2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
    valid = (x0i >= 0) & (y0i >= 0) & (x0i + 1 < level_hw[1]) & (y0i + 1 < level_hw[0])
    step, shift = 2**k, 2 ** (k + 1) - 2
    h, w = level_img.shape[:2]
    cols = jnp.clip(origin[0] + step * x0i + shift, 0, w - 1 - step)
    rows = jnp.clip(origin[1] + step * y0i + shift, 0, h - 1 - step)
    tl, tr = level_img[rows, cols], level_img[rows, cols + step]
    bl, br = level_img[rows + step, cols], level_img[rows + step, cols + step]
    out = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    return jnp.where(valid[..., None], out, 0.0)


def _chip_support(
    angle: jax.Array, rect: jax.Array, size: int, pyramid_levels: int
) -> tuple[jax.Array, jax.Array]:
    """Pyramid levels a chip needs and the (unclipped) image box it is sampled from."""
    # extract_image_chips: levels k with rect_down^k(rect).area() > size^2 (square rect, whose
    # width - 1 halves at each step), capped at what was computed.
    span = rect[..., 2] - rect[..., 0]
    k_needed = sum((span / 2**j > size - 1).astype(jnp.int32) for j in range(1, pyramid_levels + 1))
    k_needed = k_needed if pyramid_levels else jnp.zeros(span.shape, jnp.int32)
    # The crop the pyramid is built from: the rotated rect's bounding box, grown by a border
    # of 2^(k+2) - 2 pixels.
    c, s = jnp.abs(jnp.cos(angle)), jnp.abs(jnp.sin(angle))
    cx, cy = (rect[..., 0] + rect[..., 2]) / 2, (rect[..., 1] + rect[..., 3]) / 2
    ext = span / 2 * (c + s)  # square rect: half extent of its rotated bounding box
    ext = ext + (2.0 ** (k_needed + 2) - 2).astype(jnp.float32)
    return k_needed, jnp.stack([cx - ext, cy - ext, cx + ext, cy + ext], axis=-1)


def chip_support(
    landmarks5: jax.Array,
    image_hw: tuple[int, int],
    size: int = 150,
    padding: float = 0.25,
) -> jax.Array:
    """(..., 4) image box (left, top, right, bottom) whose pixels ``align_faces`` reads for a chip.

    A chip cut from any crop of the image that holds this box equals the chip cut from the
    whole image (with ``pyramid_levels`` of the whole image and the landmarks shifted).
    """
    angle, rect = face_chip_details(landmarks5, size, padding)
    return _chip_support(angle, rect, size, default_pyramid_levels(*image_hw, size))[1]


def align_faces(
    images: jax.Array,
    landmarks5: jax.Array,
    size: int = 150,
    padding: float = 0.25,
    *,
    pyramid_levels: int | None = None,
    quantize: bool = True,
) -> jax.Array:
    """Cut dlib face chips from (N, H, W, 3) float images (0..255) with (N, 5, 2) landmarks.

    Returns (N, size, size, 3) float32 chips, differentiable w.r.t. ``images``. ``pyramid_levels``
    caps the 2x downsamplings (default: enough for a face filling the image); ``quantize``
    floors pyramid levels and chips like dlib's uint8 images (straight-through gradients).
    """
    images = jnp.asarray(images, jnp.float32)
    n, h, w, _ = images.shape
    if pyramid_levels is None:
        pyramid_levels = default_pyramid_levels(h, w, size)
    angle, rect = face_chip_details(landmarks5, size, padding)
    k_needed, support = _chip_support(angle, rect, size, pyramid_levels)
    # The crop the pyramid is built from, clipped to the image and rounded (lround) to integers.
    low, high = jnp.zeros((2,), jnp.float32), jnp.asarray([w - 1.0, h - 1.0], jnp.float32)
    box = jnp.concatenate([jnp.maximum(support[:, :2], low), jnp.minimum(support[:, 2:], high)], -1)
    box = jnp.floor(box + 0.5).astype(jnp.int32)
    origin = box[:, :2]
    crop_hw = jnp.stack([box[:, 3] - box[:, 1] + 1, box[:, 2] - box[:, 0] + 1], axis=-1)

    stack = pyramid_stack(images, pyramid_levels, quantize)
    chips = jnp.zeros((n, size, size, 3), jnp.float32)
    level_hw = crop_hw
    local = rect - jnp.concatenate([origin, origin], axis=-1).astype(jnp.float32)
    offset = jnp.asarray(np.tile(_POINT_DOWN_OFFSET, 2), jnp.float32)
    for k, level_img in enumerate(stack):
        if k:
            local = local / 2 - offset  # rect_down: both corners through point_down
            # pyramid_down<2> output size, and nothing at all from an image of 8 pixels or less
            level_hw = jnp.where(jnp.min(level_hw, -1, keepdims=True) > 8, (level_hw - 3) // 2, 0)
        affine = _rect_affine(angle, local, size)
        chip_k = jax.vmap(_sample_level, in_axes=(0, 0, 0, 0, None, None))(
            level_img, affine, origin, level_hw, k, size
        )
        chips = jnp.where((k_needed == k)[:, None, None, None], chip_k, chips)
    return _floor_st(chips) if quantize else chips
