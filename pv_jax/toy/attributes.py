"""Attributes we can put into a photo ourselves, their captions, and how to measure them.

The toy base model learns text conditioning from captions that name a transformation applied to
the target photo ("a grayscale photo of a person" -> the photo in grey). Each attribute has a
scalar statistic and a threshold, calibrated on training photos only, that says whether a
generated image shows it: prompt following is the fraction of images above the threshold.
"""

from __future__ import annotations

import numpy as np

SUBJECT = "a person"
# attribute -> caption template ({} is the subject: "a person", or "S*" for PhotoVerse)
CAPTIONS = {
    "plain": "a photo of {}",
    "grayscale": "a grayscale photo of {}",
    "red light": "a photo of {} in red light",
    "blue light": "a photo of {} in blue light",
}
ATTRIBUTES = tuple(CAPTIONS)
# How often each caption is drawn in base training: half the photos untouched.
CAPTION_WEIGHTS = {"plain": 0.4, "grayscale": 0.2, "red light": 0.2, "blue light": 0.2}
_TINT = {"red light": (1.0, 0.45, 0.4), "blue light": (0.4, 0.5, 1.0)}


def caption(attribute: str, subject: str = SUBJECT) -> str:
    """The caption of an attribute for a subject."""
    return CAPTIONS[attribute].format(subject)


def apply(attribute: str, images: np.ndarray) -> np.ndarray:
    """The attribute applied to uint8 images (..., H, W, 3)."""
    if attribute == "plain":
        return images
    x = images.astype(np.float32)
    if attribute == "grayscale":
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        out = np.repeat(grey[..., None], 3, axis=-1)
    elif attribute in _TINT:
        out = x * np.array(_TINT[attribute], np.float32)
    else:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {list(ATTRIBUTES)}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def statistic(attribute: str, images: np.ndarray) -> np.ndarray:
    """Per-image evidence for an attribute (larger = more present), images (N, H, W, 3) uint8.

    grayscale: minus the mean saturation; red / blue light: the mean of that channel minus the
    mean of the other two, over the mean brightness."""
    x = images.astype(np.float32) / 255.0
    if attribute == "grayscale":
        sat = (x.max(-1) - x.min(-1)) / (x.max(-1) + 1e-3)
        return -sat.mean(axis=(1, 2))
    if attribute in _TINT:
        c = 0 if attribute == "red light" else 2
        others = [i for i in range(3) if i != c]
        means = x.mean(axis=(1, 2))
        return (means[:, c] - means[:, others].mean(-1)) / (means.mean(-1) + 1e-3)
    raise ValueError(f"no statistic for attribute {attribute!r}")


def calibrate(images: np.ndarray) -> dict[str, float]:
    """Thresholds half-way between untouched photos and photos with the attribute applied
    (in the statistic's units), from training images only."""
    out = {}
    for a in ATTRIBUTES:
        if a == "plain":
            continue
        plain, applied = statistic(a, images), statistic(a, apply(a, images))
        out[a] = float((np.median(plain) + np.median(applied)) / 2)
    return out


def present(attribute: str, images: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """(N,) bool: does each image show the attribute?"""
    return statistic(attribute, images) > thresholds[attribute]


def prompt_following(images: dict[str, np.ndarray], thresholds: dict[str, float]) -> dict:
    """Per attribute: the fraction of its images that show it (``with_word``), and of the
    plain caption's images that do (``without_word``, the same statistic without the word).
    ``images``: attribute -> (N, H, W, 3), with ``"plain"`` among them."""
    return {
        a: {
            "with_word": float(present(a, ims, thresholds).mean()),
            "without_word": float(present(a, images["plain"], thresholds).mean()),
        }
        for a, ims in images.items()
        if a != "plain"
    }
