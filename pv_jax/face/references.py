"""Reference photos and the identity of generated images, on the host with dlib.

A reference goes through the training preprocessing (detection, 5 landmarks, the 1.3x crop to
224, the ellipse mask, its descriptor); errors name the photo and the fix. Generated images are
scored by the dlib cosine of their largest face to the references' mean descriptor. (Not
imported by ``pv_jax.face`` itself: it reads photos through ``pv_jax.data.preprocess``.)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pv_jax.data.preprocess import (
    FaceRecord,
    PreprocessConfig,
    SkipError,
    check_image,
    detect_largest_face,
    face_landmarks,
    load_image,
    preprocess_image,
    target_descriptor,
)
from pv_jax.errors import MissingPathError, ReferencePhotoError
from pv_jax.face.identity import descriptor_cosine, unit_rows

# How a command line and Python name the face index; a front end passes its own words.
FACE_INDEX_FLAG = "--face-index N (face_index=N in Python)"

_ADVICE = {
    "no_face": "no face was found: use a photo where the face is clearly visible, frontal and at "
    "least ~80 px wide (a closer crop around the face helps)",
    "unreadable": "it could not be read as an image: check the path and that it is a JPEG/PNG",
    "corrupt": "the image data is damaged: re-export or re-download the photo",
    "too_small": "the image is too small: use a photo whose short side is at least 64 px",
    "too_large": "the image is too large: downscale it below 40 megapixels",
    "face_index": "there is no such face: {face_index} counts the faces found from 0, the largest",
}


def photo_advice(reason: str, detail: str, face_index: str = FACE_INDEX_FLAG) -> str:
    """What is wrong with a reference photo and its fix; ``face_index`` names the face picker."""
    return f"{_ADVICE[reason].format(face_index=face_index)} ({detail})"


def _require_file(path: str | os.PathLike) -> None:
    """MissingPathError naming a reference photo path that does not exist, and the fix."""
    if not os.path.exists(path):
        raise MissingPathError(
            f"reference {os.fspath(path)}: no such file: check the path (a relative one starts "
            f"from {os.getcwd()})"
        )


def _photo_error(name: str, e: SkipError) -> ReferencePhotoError:
    return ReferencePhotoError(
        f"reference {name}: {photo_advice(e.reason, e.detail)}",
        photo=name,
        reason=e.reason,
        detail=e.detail,
    )


def check_reference(path: str | os.PathLike) -> None:
    """What can be checked of a reference photo in milliseconds, before any model is loaded:
    the file exists and opens as an image (the face is looked for by :func:`load_reference`)."""
    _require_file(path)
    try:
        check_image(path)
    except SkipError as e:
        raise _photo_error(os.fspath(path), e) from e


def load_reference(
    source: str | os.PathLike | np.ndarray | FaceRecord,
    config: PreprocessConfig | None = None,
    *,
    face_index: int = 0,
) -> FaceRecord:
    """Detect, align and crop a face of one photo (a path or an RGB uint8 array; a FaceRecord
    is returned as it is). ``face_index``: which face, by size (0: the largest); with several
    faces, stderr says which one is used."""
    if isinstance(source, FaceRecord):
        return source
    config = config or PreprocessConfig()
    name = "<array>" if isinstance(source, np.ndarray) else os.fspath(source)
    if not isinstance(source, np.ndarray):
        _require_file(source)
    try:
        image = source if isinstance(source, np.ndarray) else load_image(source, config)
        record = preprocess_image(image, config, source=name, face_index=face_index)
    except SkipError as e:
        raise _photo_error(name, e) from e
    if record.num_faces > 1:
        print(
            f"reference {name}: {record.num_faces} faces found, using face {face_index} (by "
            f"size, 0 = the largest); {FACE_INDEX_FLAG} picks another",
            file=sys.stderr,
        )
    return record


def reference_descriptor(records: Sequence[FaceRecord]) -> np.ndarray:
    """The unit-norm mean of the references' unit dlib descriptors (one person, R photos)."""
    return unit_rows(np.mean(unit_rows([r.descriptor for r in records]), axis=0))


# Generated images smaller than this (toy models draw 64 px) are upscaled before dlib looks for
# a face: its HOG detector misses faces under about 40 px even when upsampling.
DETECT_MIN_SIDE = 256


def face_descriptor(image: np.ndarray) -> np.ndarray | None:
    """dlib's descriptor of the largest face in an RGB uint8 image, None when none is found.

    Images whose short side is under ``DETECT_MIN_SIDE`` are upscaled (bicubic) first."""
    short = min(image.shape[:2])
    if short < DETECT_MIN_SIDE:
        k = DETECT_MIN_SIDE / short
        size = (round(image.shape[1] * k), round(image.shape[0] * k))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    try:
        box, _ = detect_largest_face(image, PreprocessConfig(upsample=1))
    except SkipError:
        return None
    return target_descriptor(image, face_landmarks(image, box), 0)


def image_descriptors(images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 128) :func:`face_descriptor` of each image; a row of NaN where no face is found."""
    found = [face_descriptor(image) for image in images]
    return np.stack([np.full(128, np.nan) if d is None else d for d in found])


def identity_of(image: np.ndarray, descriptor: np.ndarray) -> float | None:
    """Cosine between the dlib descriptor of the largest face in ``image`` and ``descriptor``
    (see :func:`reference_descriptor`); None when no face is found (e.g. untrained weights)."""
    desc = face_descriptor(image)
    if desc is None:
        return None
    return float(descriptor_cosine(desc, descriptor))
