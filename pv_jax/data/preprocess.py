"""PhotoVerse preprocessing of one photo: face detection, reference/target crops, landmarks, mask.

SPEC.md "Preprocessing": the reference x_m is the face box enlarged 1.3x, resized to 224 and
background-masked; the diffusion target is 3x the box at 512. Detector, landmarks and mask are
our choices: dlib's HOG detector, its 5-point shape predictor, and a dataset parsing mask when one
is given, else an ellipse fitted to the face box. The 128-d identity descriptor of the target is
computed by dlib's own ``face_recognition_model_v1`` (the reference implementation that
``pv_jax.face`` ports), on the 512 target crop with the landmarks mapped into it, so it describes
exactly the image the face loss later compares against.

Crops that extend past the image are padded with zeros by default (``pad_mode="edge"`` repeats
the border instead).

The dataset-building command is ``pv_jax.data.cli`` (``python -m pv_jax.data``; running this
module runs it too).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# "face_index": a face asked for by index (sampling's --face-index) that was not found.
SKIP_REASONS = ("no_face", "corrupt", "too_small", "too_large", "unreadable", "face_index")


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Every number of the preprocessing; defaults follow SPEC.md ([paper] scales and sizes)."""

    reference_scale: float = 1.3  # [paper] face box enlargement for the reference x_m
    reference_size: int = 224  # [paper] CLIP ViT-L/14 input
    target_scale: float = 3.0  # [paper] looser crop for the diffusion target
    target_size: int = 512  # [paper] SD 1.5 resolution
    mask: Literal["ellipse", "dataset", "none"] = "ellipse"  # [ours] "dataset" falls back
    # [ours] ellipse semi-axes relative to the half face box, and its centre shift in box
    # heights: dlib's box stops at the brows and the lip, so the ellipse is taller than it.
    ellipse_axes: tuple[float, float] = (1.0, 1.2)
    ellipse_shift_y: float = -0.05
    pad_mode: Literal["constant", "edge"] = "constant"
    min_side: int = 64  # reject images whose short side is smaller
    max_megapixels: float = 40.0  # reject larger images (before decoding them)
    upsample: int = 1  # HOG detector upsampling: 1 finds faces down to ~40 px
    # Detection runs on a copy whose long side is at most this: HOG cost grows with the area
    # and the landmarks are still fitted on the full-resolution image.
    detect_max_side: int = 1024
    descriptor_jitters: int = 0  # dlib's num_jitters for the face descriptor


@dataclasses.dataclass
class FaceRecord:
    """One preprocessed photo: arrays in memory (encoding happens in the dataset writer)."""

    reference: np.ndarray  # (R, R, 3) uint8, background zeroed by the mask
    reference_mask: np.ndarray  # (R, R) uint8 in {0, 1}
    target: np.ndarray  # (T, T, 3) uint8
    landmarks: np.ndarray  # (5, 2) float32 (x, y) in target-crop pixels, dlib's order
    descriptor: np.ndarray  # (128,) float32 dlib face descriptor of the target crop
    face_box: np.ndarray  # (4,) float32 left, top, right, bottom in source-image pixels
    # The upright photo's (H, W), and the target square (top, left, side) in its pixels, whose
    # side is SDXL's original size (``pv_jax.train.data.micro_conditioning_ids``); stored, not
    # derived: the photo's size is not in the crops, and re-deriving the square from the
    # float32 face_box and the config could round differently from what was cut.
    source_size: np.ndarray  # (2,) int32 height, width of the upright photo
    target_box: np.ndarray  # (3,) float32 top, left, side of the target square (integers)
    num_faces: int
    mask_source: str  # "dataset", "ellipse" or "none"
    source: str
    face_index: int = 0  # which of the num_faces faces, largest first


@dataclasses.dataclass
class Skip:
    """Why a file produced no record: one of SKIP_REASONS plus a human-readable detail."""

    source: str
    reason: str
    detail: str = ""


class SkipError(Exception):
    """Raised inside preprocessing for bad input; ``preprocess_file`` turns it into a Skip."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@functools.lru_cache(maxsize=1)
def _dlib_models() -> tuple:
    """dlib's detector, 5-point predictor and face net, loaded once per process."""
    import dlib
    import face_recognition_models as frm

    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(frm.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(frm.face_recognition_model_location()),
    )


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode (L, RGBA, P, CMYK, I;16, I, F, ...) to an (H, W, 3) uint8 array."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        # 16-bit data (PNG/TIFF) uses the full 0..65535 range; "I"/"F" may also hold 8-bit data.
        peak = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, like the zero padding and the masked background.
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_image(
    path: str | os.PathLike, config: PreprocessConfig = PreprocessConfig()
) -> np.ndarray:
    """Read a photo upright (EXIF orientation applied) as RGB uint8; raise SkipError if bad."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise SkipError("too_large", str(e)) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SkipError("unreadable", f"{type(e).__name__}: {e}") from e
    with image:
        # The header gives the size before any pixel is decoded: refuse huge files cheaply.
        _check_size(image.size, config)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb_uint8(image)
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error... on bad data
            raise SkipError("corrupt", f"{type(e).__name__}: {e}") from e


def check_image(path: str | os.PathLike) -> None:
    """Cheaply check that a file is an image (header, and checksums where the format has them)
    without decoding it; raise SkipError if not."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.DecompressionBombError as e:
        raise SkipError("too_large", str(e)) from e
    except UnidentifiedImageError as e:
        raise SkipError("unreadable", f"{type(e).__name__}: {e}") from e
    except Exception as e:  # verify raises OSError, SyntaxError, struct.error... on bad data
        raise SkipError("corrupt", f"{type(e).__name__}: {e}") from e


def load_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A parsing mask file as (H, W) uint8 {0, 1} at the photo's size (non-zero = keep)."""
    with Image.open(path) as m:
        m = ImageOps.exif_transpose(m)
        mask = np.asarray(m.convert("L")) > 0
    if mask.shape != shape:  # CelebAMask-HQ masks are 512 px for 1024 px photos
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (shape[1], shape[0]), Image.NEAREST
        )
        mask = np.asarray(resized) > 0
    return mask.astype(np.uint8)


def _check_size(size: tuple[int, int], config: PreprocessConfig) -> None:
    w, h = size
    if min(w, h) < config.min_side:
        raise SkipError("too_small", f"{w}x{h} < {config.min_side} px short side")
    if w * h > config.max_megapixels * 1e6:
        raise SkipError("too_large", f"{w}x{h} > {config.max_megapixels} megapixels")


def detect_faces(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """HOG-detect faces: boxes (N, 4) (left, top, right, bottom), largest first (ties keep the
    detector's order); raise SkipError when there is none."""
    detector, _, _ = _dlib_models()
    h, w = image.shape[:2]
    factor = min(1.0, config.detect_max_side / max(h, w))
    small = image
    if factor < 1.0:
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    rects = detector(small, config.upsample)
    if len(rects) == 0:
        raise SkipError("no_face", f"no face found at upsample={config.upsample}")
    rects = sorted(rects, key=lambda r: r.width() * r.height(), reverse=True)  # stable
    # dlib rectangles are inclusive; right/bottom + 1 makes width = right - left.
    boxes = [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects]
    return np.array(boxes, np.float64) / factor


def detect_largest_face(image: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, int]:
    """HOG-detect faces; return the largest box (left, top, right, bottom) and the face count."""
    boxes = detect_faces(image, config)
    return boxes[0], len(boxes)


def face_landmarks(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """dlib's 5 landmarks (x, y) in image pixels for a face box (left, top, right, bottom)."""
    import dlib

    _, predictor, _ = _dlib_models()
    left, top, right, bottom = (int(round(v)) for v in box)
    shape = predictor(image, dlib.rectangle(left, top, right - 1, bottom - 1))
    return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


def square_box(box: np.ndarray, scale: float) -> np.ndarray:
    """Integer square (left, top, right, bottom) of side scale * max(w, h) around box's centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(1, int(round(scale * max(box[2] - box[0], box[3] - box[1]))))
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    return np.array([left, top, left + side, top + side], np.int64)


def crop_resize(
    image: np.ndarray, box: np.ndarray, size: int, pad_mode: str, resample: int
) -> np.ndarray:
    """Cut the integer box out of image (padding past the border), resized to size x size."""
    h, w = image.shape[:2]
    left, top, right, bottom = (int(v) for v in box)
    inner = image[max(top, 0) : min(bottom, h), max(left, 0) : min(right, w)]
    pads = [(max(0, -top), max(0, bottom - h)), (max(0, -left), max(0, right - w))]
    pads += [(0, 0)] * (image.ndim - 2)
    if inner.size == 0:  # box entirely outside: nothing to repeat
        crop = np.zeros((bottom - top, right - left) + image.shape[2:], image.dtype)
    elif pad_mode == "edge":
        crop = np.pad(inner, pads, mode="edge")
    else:
        crop = np.pad(inner, pads, mode="constant")
    return np.asarray(Image.fromarray(crop).resize((size, size), resample))


def ellipse_mask(box: np.ndarray, crop_box: np.ndarray, size: int, config: PreprocessConfig):
    """(size, size) uint8 {0, 1} ellipse around the face box, in the crop's pixel grid."""
    scale = size / (crop_box[2] - crop_box[0])
    cx = ((box[0] + box[2]) / 2 - crop_box[0]) * scale
    cy = ((box[1] + box[3]) / 2 + config.ellipse_shift_y * (box[3] - box[1]) - crop_box[1]) * scale
    ax = (box[2] - box[0]) / 2 * config.ellipse_axes[0] * scale
    ay = (box[3] - box[1]) / 2 * config.ellipse_axes[1] * scale
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    return ((((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) <= 1.0).astype(np.uint8)


def target_descriptor(target: np.ndarray, landmarks: np.ndarray, jitters: int) -> np.ndarray:
    """dlib's 128-d descriptor of the face in the target crop (its own 150 px face chip)."""
    import dlib

    _, _, facenet = _dlib_models()
    # dlib points are integers: rounding moves a landmark at most half a target pixel.
    pts = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks]
    xs, ys = landmarks[:, 0], landmarks[:, 1]
    rect = dlib.rectangle(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    shape = dlib.full_object_detection(rect, pts)
    return np.asarray(facenet.compute_face_descriptor(target, shape, jitters), np.float32)


def preprocess_image(
    image: np.ndarray,
    config: PreprocessConfig = PreprocessConfig(),
    mask: np.ndarray | None = None,
    source: str = "",
    face_index: int = 0,
) -> FaceRecord:
    """Preprocess an RGB uint8 image (and optional parsing mask); raise SkipError if unusable.

    ``face_index``: which face when there are several, by size (0, the default: the largest)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    _check_size((image.shape[1], image.shape[0]), config)
    boxes = detect_faces(image, config)
    num_faces = len(boxes)
    if not 0 <= face_index < num_faces:
        found = f"{num_faces} face{'s' if num_faces > 1 else ''} found"
        raise SkipError("face_index", f"face index {face_index} asked for, {found}")
    box = boxes[face_index]
    landmarks = face_landmarks(image, box)

    ref_box = square_box(box, config.reference_scale)
    size = config.reference_size
    reference = crop_resize(image, ref_box, size, config.pad_mode, Image.BICUBIC)
    if config.mask == "none":
        ref_mask, mask_source = np.ones((size, size), np.uint8), "none"
    elif config.mask == "dataset" and mask is not None:
        # Outside the photo nothing is face: pad the mask with zeros whatever pad_mode says.
        ref_mask = crop_resize(mask, ref_box, size, "constant", Image.NEAREST)
        mask_source = "dataset"
    else:
        ref_mask, mask_source = ellipse_mask(box, ref_box, size, config), "ellipse"
    reference = reference * ref_mask[..., None]

    tgt_box = square_box(box, config.target_scale)
    target = crop_resize(image, tgt_box, config.target_size, config.pad_mode, Image.BICUBIC)
    # Pixel (i, j) of the crop covers source pixel centre tgt_box[:2] + (i, j) + 0.5; after the
    # resize, centres scale about the crop's corner.
    tgt_scale = config.target_size / (tgt_box[2] - tgt_box[0])
    lm_target = ((landmarks + 0.5 - tgt_box[:2]) * tgt_scale - 0.5).astype(np.float32)
    descriptor = target_descriptor(target, lm_target, config.descriptor_jitters)
    return FaceRecord(
        reference=reference.astype(np.uint8),
        reference_mask=ref_mask,
        target=target,
        landmarks=lm_target,
        descriptor=descriptor,
        face_box=box.astype(np.float32),
        source_size=np.array(image.shape[:2], np.int32),
        target_box=np.array([tgt_box[1], tgt_box[0], tgt_box[2] - tgt_box[0]], np.float32),
        num_faces=num_faces,
        mask_source=mask_source,
        source=source,
        face_index=face_index,
    )


def preprocess_file(
    path: str | os.PathLike,
    config: PreprocessConfig = PreprocessConfig(),
    mask_path: str | os.PathLike | None = None,
) -> FaceRecord | Skip:
    """Preprocess one file; never raises for bad input, returns a Skip with the reason instead."""
    source = os.fspath(path)
    try:
        image = load_image(path, config)
        mask = None
        if config.mask == "dataset" and mask_path is not None:
            try:
                mask = load_mask(mask_path, image.shape[:2])
            except Exception as e:
                raise SkipError("unreadable", f"mask {os.fspath(mask_path)}: {e}") from e
        return preprocess_image(image, config, mask, source)
    except SkipError as e:
        return Skip(source, e.reason, e.detail)
    except Exception as e:  # anything else in dlib/PIL on odd data: skip, never stop the run
        return Skip(source, "corrupt", f"{type(e).__name__}: {e}")


if __name__ == "__main__":  # the command of ``python -m pv_jax.data``, under its old name
    from pv_jax.data.cli import main

    raise SystemExit(main())
