"""The PhotoVerse pipeline: load once, then call with reference photos, prompts and knobs.

    pipe = PhotoVersePipeline.from_checkpoint("runs/pv_sd15")       # a train_tpu.py workdir
    result = pipe(["me.jpg"], ["a photo of S* as an astronaut"], seed=0)
    result.images        # (N, H, W, 3) uint8
    result.metadata      # prompts, seeds, knobs, timings (compile vs run), identity similarity

References go through the training preprocessing (dlib detection, 5 landmarks, 1.3x crop to
224, ellipse mask); several photos of one person are averaged after the adapters. ``sample.py``
is a thin command line over this class.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

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
from pv_jax.errors import (
    CheckpointMismatchError,
    InputError,
    MissingPathError,
    PromptError,
    ReferencePhotoError,
)
from pv_jax.face import descriptor_cosine, unit_rows
from pv_jax.paths import is_remote, refresh, run_path
from pv_jax.photoverse import PhotoVerseBundle, split_trainable
from pv_jax.photoverse.factory import build_bundle
from pv_jax.photoverse.placeholder import PromptTokens
from pv_jax.run_checkpoint import Checkpointer, ShapeMismatchError
from pv_jax.sampling.options import SamplingOptions
from pv_jax.sampling.sampler import Sampler, empty_prompt_ids
from pv_jax.sampling.tuned import tuned_path, tuned_settings

# ReferencePhotoError and CheckpointMismatchError live in pv_jax.errors (with InputError, what
# a command line reports as one line); importing them from here keeps working.


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


def identity_of(image: np.ndarray, descriptor: np.ndarray) -> float | None:
    """Cosine between the dlib descriptor of the largest face in ``image`` and ``descriptor``
    (see :func:`reference_descriptor`); None when no face is found (e.g. untrained weights)."""
    desc = face_descriptor(image)
    if desc is None:
        return None
    return float(descriptor_cosine(desc, descriptor))


@dataclasses.dataclass(frozen=True)
class _Draw:
    """The images of one call, the rows per sampler call and the timings."""

    images: np.ndarray  # (N, H, W, 3) uint8
    batch_size: int
    timings: dict[str, float]


@dataclasses.dataclass
class SampleResult:
    """Generated images and everything needed to reproduce and judge them."""

    images: np.ndarray  # (N, H, W, 3) uint8
    references: list[FaceRecord]
    metadata: dict[str, Any]


class PhotoVersePipeline:
    """A loaded PhotoVerse model and its compiled sampler."""

    def __init__(self, bundle: PhotoVerseBundle, *, resolution: int | None = None):
        self.bundle = bundle
        self.sampler = Sampler(bundle.model, bundle.schedule)
        unet = bundle.model.unet.config
        vae = bundle.model.vae.config
        self.latent = (resolution // vae.downsample_factor) if resolution else unet.sample_size
        self.latent_channels = unet.in_channels
        self.empty = empty_prompt_ids(bundle.tokenizer)
        # What a call without options samples with: a run's tuned settings (from_checkpoint).
        self.defaults = SamplingOptions()
        self.tuned_from: str | None = None

    @classmethod
    def from_checkpoint(
        cls,
        workdir: str | os.PathLike,
        *,
        step: int | None = None,
        sd_folder: str | None = None,
        clip_vision_folder: str | None = None,
        use_ema: bool = True,
        model_overrides: dict | None = None,
    ) -> PhotoVersePipeline:
        """The trained weights of a ``train_tpu.py`` run (its ``--workdir``) on the base model
        named in its config (or the folders given here); the run's tuned sampling settings
        (:mod:`pv_jax.sampling.tuned`) become :attr:`defaults`."""
        defaults = SamplingOptions(**tuned_settings(workdir))  # a bad file fails before the load
        bundle = load_trained(
            workdir,
            step=step,
            sd_folder=sd_folder,
            clip_vision_folder=clip_vision_folder,
            use_ema=use_ema,
            model_overrides=model_overrides,
        )
        pipe = cls(bundle)
        pipe.defaults, pipe.tuned_from = defaults, tuned_path(workdir)
        return pipe

    @property
    def uses_identity(self) -> bool:
        """Whether the image branch reads the references' dlib descriptors (identity tokens)."""
        return self.bundle.config.uses_identity

    @property
    def resolution(self) -> int:
        """Output image side in pixels."""
        return self.latent * self.bundle.model.vae.config.downsample_factor

    def init_image(self, record: FaceRecord) -> np.ndarray:
        """img2img start (1, H, W, 3) in [0, 1]: the reference's target crop (the training
        target's framing, 3x the face box) at the output resolution."""
        size = self.resolution
        image = Image.fromarray(record.target).resize((size, size), Image.Resampling.BICUBIC)
        return (np.asarray(image, np.float32) / 255.0)[None]

    def __call__(
        self,
        references: Sequence[str | os.PathLike | np.ndarray | FaceRecord],
        prompts: Sequence[str],
        options: SamplingOptions | None = None,
        *,
        identity: bool = True,
        **overrides,
    ) -> SampleResult:
        """``num_images`` images per prompt of the person in ``references`` (paths, RGB arrays
        or records from :func:`load_reference`).

        ``options`` (default: :attr:`defaults`, a run's tuned settings) with ``overrides`` of
        its fields, e.g.
        ``pipe(refs, prompts, seed=3, steps=10)``. Image j (prompt-major order) uses seed
        ``seed + j`` whatever the batch it is drawn in; ``batch_size`` images go through the
        sampler at once (the last batch is padded, so one compilation serves every batch).
        ``strength`` < 1 starts from the first reference's noised target crop (img2img) and runs
        the last ``int(steps * strength)`` steps. ``identity``: score every image's face against
        the references (dlib).
        """
        opts = (options or self.defaults).replace(**overrides)
        records, tokens = self._prepare(references, prompts, opts)
        jobs = [p for p in range(len(prompts)) for _ in range(opts.num_images)]
        draw = self._draw(records, tokens, jobs, opts)
        similarity = self._score_identity(draw.images, records) if identity else []
        metadata = self._metadata(prompts, jobs, records, tokens, opts, draw, similarity)
        return SampleResult(draw.images, records, metadata)

    def _knobs(self, opts: SamplingOptions) -> dict[str, float]:
        """gamma, sigma and alpha: the options' where set, else the model config's."""
        cfg = self.bundle.config
        return {
            k: getattr(cfg, k) if getattr(opts, k) is None else getattr(opts, k)
            for k in ("gamma", "sigma", "alpha")
        }

    def _prepare(
        self, references: Sequence, prompts: Sequence[str], opts: SamplingOptions
    ) -> tuple[list[FaceRecord], PromptTokens]:
        """The references' face records and the prompts' tokens: bad input fails here."""
        cfg = self.bundle.config
        if not references:
            raise ReferencePhotoError("no reference photo given: pass at least one (--ref PHOTO)")
        if not prompts:
            raise PromptError("no prompt given: pass at least one (--prompt 'a photo of S* ...')")
        m = opts.num_words or cfg.words
        if m > len(cfg.text_layers):
            raise InputError(
                f"num_words (--num-words) {m} is more than the {len(cfg.text_layers)} "
                "pseudo-words this model was trained with"
            )
        tokens = self.bundle.tokenizer(list(prompts), m, missing=opts.missing_placeholder)
        records = [load_reference(r, face_index=opts.face_index) for r in references]
        return records, tokens

    def _draw(
        self,
        records: list[FaceRecord],
        tokens: PromptTokens,
        jobs: list[int],
        opts: SamplingOptions,
    ) -> _Draw:
        """Image j of prompt ``jobs[j]`` from seed ``opts.seed + j``, ``batch_size`` at a time."""
        refs = np.stack([r.reference for r in records])
        descs = np.stack([r.descriptor for r in records]) if self.uses_identity else None
        init = self.init_image(records[0]) if opts.strength < 1.0 else None
        rows = min(opts.batch_size, len(jobs))
        chunks, compile_s, compiled, t0 = [], 0.0, 0, time.perf_counter()
        starts = range(0, len(jobs), rows)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=len(starts) < 2):
            idx = list(range(start, min(start + rows, len(jobs))))
            padded = idx + [idx[-1]] * (rows - len(idx))
            seeds = [opts.seed + j for j in padded]
            out = self._draw_batch(
                refs, descs, tokens, [jobs[j] for j in padded], seeds, init, opts
            )
            chunks.append(out[: len(idx)])
            compile_s += self.sampler.last_compile_s  # this thread's call (a server's too)
            compiled += self.sampler.last_compiled
        run_s = time.perf_counter() - t0 - compile_s
        timings = {
            "compiled": compiled,  # programs this call compiled (0: it reused them)
            "compile_s": round(compile_s, 3),
            "run_s": round(run_s, 3),
            "s_per_image": round(run_s / len(jobs), 4),
        }
        images = (np.concatenate(chunks) * 255).round().astype(np.uint8)
        return _Draw(images, rows, timings)

    def _draw_batch(
        self,
        refs: np.ndarray,
        descriptors: np.ndarray | None,
        tokens: PromptTokens,
        prompt_rows: list[int],
        seeds: list[int],
        init: np.ndarray | None,
        opts: SamplingOptions,
    ) -> np.ndarray:
        """One sampler call: row b draws prompt ``prompt_rows[b]`` from seed ``seeds[b]``;
        images (B, H, W, 3) in [0, 1]."""
        shape = (self.latent, self.latent, self.latent_channels)
        keys = jax.vmap(jax.random.key)(np.asarray(seeds))
        noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
        rows = np.asarray(prompt_rows)
        out = self.sampler(
            refs,
            tokens.input_ids[rows],
            tokens.slots[rows],
            noise=noise,
            key=jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
            input_ids_2=None if tokens.input_ids_2 is None else tokens.input_ids_2[rows],
            **self.empty,
            num_words=tokens.num_words,
            guidance=opts.guidance,
            spec=opts.spec,
            init_images=init,
            descriptors=descriptors,
            **self._knobs(opts),
        )
        return np.asarray(out)

    @staticmethod
    def _score_identity(images: np.ndarray, records: list[FaceRecord]) -> list[float | None]:
        """Each image's identity similarity to the references (None where no face is found)."""
        target = reference_descriptor(records)
        return [identity_of(img, target) for img in images]

    def _metadata(
        self,
        prompts: Sequence[str],
        jobs: list[int],
        records: list[FaceRecord],
        tokens: PromptTokens,
        opts: SamplingOptions,
        draw: _Draw,
        similarity: list[float | None],
    ) -> dict[str, Any]:
        """What samples.json records of a call: per-image prompts and seeds, the settings with
        the model's defaults filled in, identity and timings."""
        return {
            "prompts": [prompts[p] for p in jobs],
            "seeds": [opts.seed + j for j in range(len(jobs))],
            "references": [r.source for r in records],
            "face_index": [r.face_index for r in records],
            "faces_found": [r.num_faces for r in records],
            "num_words": tokens.num_words,
            "steps": opts.steps,
            "eta": opts.eta,
            "strength": opts.strength,
            "guidance": opts.guidance,
            "uncond": opts.uncond,
            "tuned_from": self.tuned_from,  # the tuning.json that set the run's defaults
            "image_source": self.bundle.config.image_source,  # what the image branch reads
            **self._knobs(opts),
            "batch_size": draw.batch_size,
            "resolution": int(draw.images.shape[1]),
            "identity_similarity": similarity,
            "timings": draw.timings,
        }


def check_model_args(args: argparse.Namespace) -> None:
    """Before anything is loaded: the run (``--ckpt``) and the base folders a command line
    names exist."""
    if args.tiny:
        return
    if not (run_path(args.ckpt) / "checkpoints").is_dir():
        raise MissingPathError(
            f"--ckpt {args.ckpt} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    for flag, folder in (
        ("--sd-folder", args.sd_folder),
        ("--clip-vision-folder", args.clip_vision_folder),
    ):
        if folder and not is_remote(folder) and not os.path.isdir(folder):
            raise MissingPathError(f"{flag} {folder}: no such folder")


def pipeline_from_args(args: argparse.Namespace) -> tuple[PhotoVersePipeline, str]:
    """The pipeline a command line asks for (``--tiny`` or ``--ckpt`` with optional base
    folders), and a description of its weights for the outputs."""
    if args.tiny:
        from pv_jax.photoverse import tiny_photoverse

        weights = "tiny random networks, untrained: the images are noise by design"
        return PhotoVersePipeline(tiny_photoverse()), weights
    pipe = PhotoVersePipeline.from_checkpoint(
        args.ckpt, sd_folder=args.sd_folder, clip_vision_folder=args.clip_vision_folder
    )
    return pipe, f"trained checkpoint {args.ckpt}"


def _find_base_folder(folder: str, workdir: str | os.PathLike) -> str:
    """A relative base folder of a saved config: from the current directory if it is there,
    else from the nearest parent of the workdir that holds it (a model folder that carries its
    base, like ``models/toy_faces``, works from anywhere)."""
    path = Path(folder)
    if not folder or path.is_absolute() or path.exists() or is_remote(workdir):
        return folder
    for parent in Path(workdir).parents:
        if (parent / path).exists():
            return str(parent / path)
    return folder


def load_trained(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    sd_folder: str | None = None,
    clip_vision_folder: str | None = None,
    use_ema: bool = True,
    model_overrides: dict | None = None,
) -> PhotoVerseBundle:
    """The PhotoVerse of a training run (local or ``gs://``) with its trained weights (the EMA
    ones if kept and ``use_ema``). Only those weights are read (an Orbax partial restore): no
    optimizer is built and the optimizer state is never loaded."""
    workdir = run_path(workdir)
    refresh(workdir)  # a live run may have saved since this process last looked
    if not (workdir / "checkpoints").is_dir():
        raise MissingPathError(
            f"{workdir} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    ckpt = Checkpointer(workdir, every=1, keep=1_000_000)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(
                f"{workdir}/checkpoints holds no finished checkpoint: wait for the run's first "
                "save (train.checkpoint_every) or pass another --ckpt"
            )
        cfg = ml_collections.ConfigDict(ckpt.saved_config(step))
        if sd_folder:
            cfg.base.sd_folder = sd_folder
        if clip_vision_folder:
            cfg.base.clip_vision_folder = clip_vision_folder
        for field in ("sd_folder", "clip_vision_folder"):
            cfg.base[field] = _find_base_folder(cfg.base[field], workdir)
        # The base as found (local folders absolute), for exports that name it.
        base = {
            k: v if not v or is_remote(v) else os.path.abspath(v)
            for k, v in ((k, cfg.base.get(k)) for k in ("sd_folder", "clip_vision_folder"))
        } | {"kind": cfg.base.get("kind")}
        if model_overrides:
            cfg.model.update(model_overrides)
        bundle = build_bundle(cfg, face_net=False)  # sampling needs no face net (not saved)
        graphdef, trainable, frozen = split_trainable(bundle.model)
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the sampler's device
        shardings = jax.tree.map(lambda _: one_device, trainable)
        weights, which = ckpt.restore_weights(step, trainable, shardings, ema=use_ema)
    except ShapeMismatchError as e:
        raise CheckpointMismatchError(
            f"checkpoint {workdir} step {step} does not fit the base model built from its "
            f"config (sd_folder={cfg.base.sd_folder!r}, kind={cfg.base.kind!r}): {e}. Load it "
            "onto the SD / CLIP folders it was trained with."
        ) from e
    finally:
        ckpt.close()
    bundle.model = nnx.merge(graphdef, weights, frozen)
    bundle.source = {
        "workdir": str(workdir),
        "step": step,
        "weights": which,
        "base": base,
        "data_split": cfg.data.get("split", "train"),  # the records the run trained on
    }
    return bundle
