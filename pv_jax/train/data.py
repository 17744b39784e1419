"""Training batches: this process's rows of each global batch, with tokenised prompts.

Two sources share one interface, an iterator with grain's checkpoint protocol (``get_state``
-> bytes, ``set_state(bytes)``, ``start_prefetch``), so that ``grain.checkpoint.CheckpointSave``
stores each process's position in the checkpoint and a resumed run sees the exact same data:

- :class:`RecordBatches`: the preprocessed face dataset (``pv_jax.data``), read with grain,
  sharded by JAX process, reshuffled every epoch, the target resized to the training resolution.
- :class:`SyntheticBatches`: random images and faces, a pure function of (seed, step, process),
  for smoke runs, tests and benchmarks.

Prompts come from ``data.prompts`` templates (each with the placeholder), picked per example.

SDXL: with ``micro_conditioning=True`` a batch also holds ``time_ids`` (B, 6) float32, SDXL's
size/crop conditioning of each target (:func:`micro_conditioning_ids`); with a tokenizer that
has SDXL's second tokenizer, ``input_ids_2`` too.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from pv_jax.models.sdxl import sdxl_time_ids
from pv_jax.photoverse import PlaceholderTokenizer

# dlib's 5 landmarks (eye corners, nose) of a face centred in a unit target crop, as the
# preprocessing's 3x face-box target places it (x, y fractions of the crop size).
_SYNTHETIC_LANDMARKS = np.array(
    [[0.64, 0.42], [0.56, 0.42], [0.36, 0.42], [0.44, 0.42], [0.5, 0.56]], np.float32
)


class DataError(ValueError):
    """A dataset that cannot feed the configured run."""


def _tokens(
    tokenizer: PlaceholderTokenizer, prompts: Sequence[str], picks: np.ndarray, num_words: int
) -> dict[str, np.ndarray]:
    """input_ids, slots and (SDXL's second tokenizer) input_ids_2 of the picked prompts."""
    return tokenizer([prompts[i] for i in picks], num_words).arrays()


def micro_conditioning_ids(target_box: np.ndarray, resolution: int) -> np.ndarray:
    """SDXL's time ids (B, 6) float32 of face targets: original (h, w), crop (top, left),
    target (h, w).

    ``target_box``: (B, 3) target square (top, left, side) in source pixels (``FaceRecord``).
    [ours] The training pixels are the square, ``side`` source pixels a side, rescaled by
    k = resolution / side; so the square is the original image and nothing of it is cropped:

    - original_size = (side, side);
    - crop_top_left = (0, 0);
    - target_size = (resolution, resolution).

    Not SDXL's rule for whole photos (the photo's (H, W) and the crop's corner in the photo
    rescaled to its short side): SDXL reads the rescale factor from original vs target size,
    and a face square is far smaller than the photo's short side, so the photo's size would
    claim sharp, downsampled pixels where they are upsampled k times. Crop (0, 0) is also what
    the sampler passes. A square past the border is zero padded; SDXL's ids have no term for it.
    """
    res = float(resolution)
    side = np.asarray(target_box, np.float64).reshape(-1, 3)[:, 2:3]
    size = np.concatenate([side, side], axis=1)
    return sdxl_time_ids(size, (0.0, 0.0), (res, res), len(side)).astype(np.float32)


def default_time_ids(batch: int, resolution: int) -> np.ndarray:
    """SDXL's inference default (B, 6) float32: original_size = target_size = (resolution,
    resolution), crop (0, 0); for targets whose photo geometry is unknown."""
    res = float(resolution)
    return sdxl_time_ids((res, res), (0.0, 0.0), (res, res), batch)


class SyntheticBatches(Iterator[dict[str, np.ndarray]]):
    """Random reference/target images with a jittered face layout. Row r of global batch n is a
    function of (seed, n, r) only, so any number of processes sees the same global batches.

    ``micro_conditioning``: batches also hold ``time_ids`` (B, 6) float32 of a random photo
    target square per row (:meth:`_geometry`) through :func:`micro_conditioning_ids`."""

    def __init__(
        self,
        tokenizer: PlaceholderTokenizer,
        prompts: Sequence[str],
        *,
        local_batch: int,
        resolution: int,
        reference_size: int = 224,
        num_words: int,
        seed: int = 0,
        process_index: int = 0,
        micro_conditioning: bool = False,
    ):
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.local_batch, self.resolution = local_batch, resolution
        self.reference_size, self.num_words = reference_size, num_words
        self.seed, self.process_index = seed, process_index
        self.micro_conditioning = micro_conditioning
        self.index = 0

    def _row(self, row: int) -> tuple:
        r = np.random.default_rng((self.seed, self.index, row))
        s, ref = self.resolution, self.reference_size
        lm = (_SYNTHETIC_LANDMARKS + r.uniform(-0.02, 0.02, (5, 2))) * s
        out = (
            r.integers(0, 256, (ref, ref, 3), dtype=np.uint8),
            r.integers(0, 256, (s, s, 3), dtype=np.uint8),
            lm.astype(np.float32),
            int(r.integers(len(self.prompts))),
        )
        # Drawn last, from the same stream: the rows above do not depend on the flag.
        return out + ((self._geometry(r),) if self.micro_conditioning else (None,))

    @staticmethod
    def _geometry(r: np.random.Generator) -> np.ndarray:
        """A plausible target square (top, left, side) in a photo's pixels: photos of
        256..2048 px a side, a square of 0.3..1.2 times the short side (3x a face box), which
        may pass any border by up to a quarter of its side (the zero-padded case)."""
        h, w = (int(v) for v in r.integers(256, 2049, 2))
        side = max(1, round(r.uniform(0.3, 1.2) * min(h, w)))
        top = int(r.integers(-(side // 4), h - side + side // 4 + 1))
        left = int(r.integers(-(side // 4), w - side + side // 4 + 1))
        return np.array([top, left, side], np.float32)

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.process_index * self.local_batch
        refs, targets, lms, picks, boxes = zip(
            *(self._row(first + i) for i in range(self.local_batch)), strict=True
        )
        self.index += 1
        batch = {
            "reference": np.stack(refs),
            "target": np.stack(targets),
            "landmarks": np.stack(lms),
            **_tokens(self.tokenizer, self.prompts, np.asarray(picks), self.num_words),
        }
        if self.micro_conditioning:
            batch["time_ids"] = micro_conditioning_ids(np.stack(boxes), self.resolution)
        return batch

    def get_state(self) -> bytes:
        """Position in the stream (JSON)."""
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from a :meth:`get_state` value."""
        self.index = int(json.loads(state)["index"])

    def start_prefetch(self) -> None:
        """Nothing to prefetch (grain's checkpoint handler calls this after a restore)."""


def resize_target(image: np.ndarray, landmarks: np.ndarray, size: int):
    """Resize a square target crop to ``size`` and scale its landmarks with it."""
    h = image.shape[0]
    if h == size:
        return image, landmarks
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    # Pixel centres: x' + 0.5 = (x + 0.5) * size / h.
    return out, (landmarks + 0.5) * (size / h) - 0.5


def augment_reference(image: np.ndarray, r: np.random.Generator, strength: float) -> np.ndarray:
    """[ours] A randomly moved, mirrored and recoloured copy of a masked reference (H, W, 3)
    uint8, so that the image branch cannot key on the target's own pixels.

    ``strength`` in [0, 1] scales every range: a mirror with probability 0.5 (any strength > 0);
    rotation up to 10 degrees, zoom 1 +- 0.1, shift up to 6% of the side; brightness, contrast
    and saturation factors 1 +- 0.2. Pixels moved in from outside are black, as the mask's
    background. Strength 0 returns the image unchanged."""
    if strength <= 0:
        return image
    h, w = image.shape[:2]
    angle = np.deg2rad(r.uniform(-10, 10) * strength)
    zoom = 1.0 + r.uniform(-0.1, 0.1) * strength
    shift = r.uniform(-0.06, 0.06, 2) * strength * np.array([w, h])
    mirror = r.random() < 0.5
    gains = 1.0 + r.uniform(-0.2, 0.2, 3) * strength  # brightness, contrast, saturation
    # Output pixel p samples input c + A^-1 (p - c - shift), about the centre c.
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    inv = np.array([[cos, sin], [-sin, cos]])
    if mirror:
        inv = inv @ np.diag([-1.0, 1.0])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = c - inv @ (c + shift)
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    moved = Image.fromarray(image).transform(
        (w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=(0, 0, 0)
    )
    x = np.asarray(moved, np.float32) * gains[0]
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * gains[2]  # saturation about each pixel's grey
    inside = np.asarray(moved).any(axis=-1, keepdims=True)  # keep the black background black
    x = np.where(inside, (x - x.mean()) * gains[1] + x.mean(), 0.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class RecordBatches(Iterator[dict[str, np.ndarray]]):
    """The preprocessed face dataset through grain, endlessly, in this process's shard.

    ``micro_conditioning``: batches also hold ``time_ids`` (B, 6) float32 from each record's
    stored target square (:func:`micro_conditioning_ids`); a dataset built before version 1.1.0
    has none, and gets :func:`default_time_ids` with a warning at construction.

    [ours] ``reference_augment`` > 0: each reference is an :func:`augment_reference` copy;
    ``descriptor_noise`` > 0: Gaussian noise of that standard deviation per dimension on each
    stored dlib descriptor (what the identity tokens read; the expected distance from the clean
    descriptor is about sqrt(128) = 11.3 times it). Both drawn from (seed, batch counter), so a
    resumed run sees the same draws."""

    def __init__(
        self,
        data_dir: str,
        tokenizer: PlaceholderTokenizer,
        prompts: Sequence[str],
        *,
        local_batch: int,
        resolution: int,
        num_words: int,
        seed: int = 0,
        worker_count: int = 0,
        split: str = "train",
        micro_conditioning: bool = False,
        reference_augment: float = 0.0,
        descriptor_noise: float = 0.0,
    ):
        from pv_jax.data.dataset import GEOMETRY_KEYS, load_source, make_loader

        try:
            source = load_source(data_dir, split)
        except Exception as e:  # tfds raises several kinds for a missing/foreign folder
            raise DataError(
                f"data.data_dir={data_dir!r} holds no built PhotoVerse face dataset ({e}); "
                "build one with `python -m pv_jax.data`, or set data.source="
                "'synthetic'"
            ) from e
        if len(source) == 0:
            raise DataError(f"the dataset in {data_dir!r} is empty: no {split} examples")
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.resolution, self.num_words, self.seed = resolution, num_words, seed
        self.micro_conditioning = micro_conditioning
        self.reference_augment, self.descriptor_noise = reference_augment, descriptor_noise
        if micro_conditioning and not all(k in source[0] for k in GEOMETRY_KEYS):
            warnings.warn(
                f"the dataset in {data_dir!r} predates version 1.1.0 and stores no photo size "
                "or crop (source_size, target_box): SDXL's time ids fall back to its inference "
                "default, original_size = target_size = (resolution, resolution) and crop "
                "(0, 0), for every example; rebuild the dataset to condition on them",
                stacklevel=2,
            )
        self.loader = make_loader(
            source,
            local_batch,
            seed=seed,
            num_epochs=None,
            drop_remainder=True,
            worker_count=worker_count,
        )
        self.iterator = iter(self.loader)
        self.count = 0

    def __next__(self) -> dict[str, np.ndarray]:
        ex = next(self.iterator)
        targets, lms = zip(
            *(
                resize_target(img, lm, self.resolution)
                for img, lm in zip(ex["target"], ex["landmarks"], strict=True)
            ),
            strict=True,
        )
        r = np.random.default_rng((self.seed, self.count))
        aug = np.random.default_rng((self.seed, self.count, 1))  # apart: prompts stay as before
        self.count += 1
        picks = r.integers(len(self.prompts), size=len(targets))
        refs, descriptors = ex["reference"], ex["descriptor"]
        if self.reference_augment > 0:
            refs = np.stack([augment_reference(x, aug, self.reference_augment) for x in refs])
        if self.descriptor_noise > 0:
            noise = aug.normal(0.0, self.descriptor_noise, descriptors.shape)
            descriptors = (descriptors + noise).astype(descriptors.dtype)
        batch = {
            "reference": refs,
            "target": np.stack(targets),
            "landmarks": np.stack(lms).astype(np.float32),
            "descriptor": descriptors,
            **_tokens(self.tokenizer, self.prompts, picks, self.num_words),
        }
        if self.micro_conditioning:
            if "target_box" in ex:
                ids = micro_conditioning_ids(ex["target_box"], self.resolution)
            else:  # an older dataset: warned about in __init__
                ids = default_time_ids(len(targets), self.resolution)
            batch["time_ids"] = ids
        return batch

    def get_state(self) -> bytes:
        """Position (JSON): grain's iterator state and the prompt counter."""
        return json.dumps(
            {"grain": self.iterator.get_state().decode(), "count": self.count}
        ).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from a :meth:`get_state` value."""
        d = json.loads(state)
        self.iterator.set_state(d["grain"].encode())
        self.count = int(d["count"])

    def start_prefetch(self) -> None:
        """grain's checkpoint handler calls this after a restore; the loader prefetches itself."""
