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

import dataclasses
import os
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
    Skip,
    SkipError,
    detect_largest_face,
    face_landmarks,
    preprocess_file,
    preprocess_image,
    target_descriptor,
)
from pv_jax.paths import is_remote, run_path
from pv_jax.photoverse import PhotoVerseBundle, split_trainable
from pv_jax.sampling.sampler import Sampler, SamplerSpec


class ReferencePhotoError(ValueError):
    """A reference photo that cannot be used (no face, unreadable); names the file and the fix."""


class CheckpointMismatchError(ValueError):
    """A training checkpoint that does not fit the base model it is loaded onto."""


# What a command line reports as one line on stderr (exit status 2) instead of a traceback: bad
# photos, prompts, checkpoints, paths and settings. PromptError is a ValueError.
INPUT_ERRORS = (ReferencePhotoError, CheckpointMismatchError, FileNotFoundError, ValueError)


_ADVICE = {
    "no_face": "no face was found: use a photo where the face is clearly visible, frontal and at "
    "least ~80 px wide (a closer crop around the face helps)",
    "unreadable": "it could not be read as an image: check the path and that it is a JPEG/PNG",
    "corrupt": "the image data is damaged: re-export or re-download the photo",
    "too_small": "the image is too small: use a photo whose short side is at least 64 px",
    "too_large": "the image is too large: downscale it below 40 megapixels",
}


def load_reference(
    source: str | os.PathLike | np.ndarray, config: PreprocessConfig | None = None
) -> FaceRecord:
    """Detect, align and crop the face of one photo (a path or an RGB uint8 array)."""
    config = config or PreprocessConfig()
    if isinstance(source, np.ndarray):
        try:
            return preprocess_image(source, config, source="<array>")
        except SkipError as e:
            raise ReferencePhotoError(f"reference <array>: {_ADVICE[e.reason]} ({e.detail})") from e
    out = preprocess_file(source, config)
    if isinstance(out, Skip):
        raise ReferencePhotoError(
            f"reference {os.fspath(source)}: {_ADVICE[out.reason]} ({out.detail})"
        )
    return out


def reference_descriptor(records: Sequence[FaceRecord]) -> np.ndarray:
    """The unit-norm mean of the references' unit dlib descriptors (one person, R photos)."""
    unit = [r.descriptor / (np.linalg.norm(r.descriptor) + 1e-12) for r in records]
    mean = np.mean(unit, axis=0)
    return mean / (np.linalg.norm(mean) + 1e-12)


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
    return float(desc @ descriptor / (np.linalg.norm(desc) * np.linalg.norm(descriptor) + 1e-12))


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
        self.empty_ids = bundle.tokenizer.plain([""])

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
        named in its config (or the folders given here)."""
        bundle = load_trained(
            workdir,
            step=step,
            sd_folder=sd_folder,
            clip_vision_folder=clip_vision_folder,
            use_ema=use_ema,
            model_overrides=model_overrides,
        )
        return cls(bundle)

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
        references: Sequence[str | os.PathLike | np.ndarray],
        prompts: Sequence[str],
        *,
        num_images: int = 1,
        seed: int = 0,
        steps: int = 25,
        guidance: float = 7.5,
        eta: float = 0.0,
        strength: float = 1.0,
        uncond: str = "base",
        batch_size: int = 4,
        num_words: int | None = None,
        gamma: float | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        identity: bool = True,
    ) -> SampleResult:
        """``num_images`` images per prompt of the person in ``references``.

        Image j (prompt-major order) uses seed ``seed + j`` whatever the batch it is drawn in;
        ``batch_size`` images go through the sampler at once (the last batch is padded, so one
        compilation serves every batch). ``strength`` < 1 starts from the first reference's
        noised target crop (img2img) and runs the last ``int(steps * strength)`` steps.
        ``uncond``: the guidance's unconditional pass through the frozen base ("base") or the
        trained LoRA ("lora"); see :class:`SamplerSpec`.
        """
        cfg = self.bundle.config
        m = num_words or cfg.words
        knobs = dict(
            gamma=cfg.gamma if gamma is None else gamma,
            sigma=cfg.sigma if sigma is None else sigma,
            alpha=cfg.alpha if alpha is None else alpha,
        )
        if not references:
            raise ReferencePhotoError("no reference photo given: pass at least one (--ref PHOTO)")
        if num_images < 1 or batch_size < 1:
            raise ValueError(f"num_images and batch_size must be >= 1: {num_images}, {batch_size}")
        spec = SamplerSpec(steps=steps, eta=eta, strength=strength, uncond=uncond)  # checks them
        tokens = self.bundle.tokenizer(list(prompts), m)  # a prompt without S* fails here
        records = [load_reference(r) for r in references]
        refs = np.stack([r.reference for r in records])
        init = self.init_image(records[0]) if strength < 1.0 else None
        jobs = [p for p in range(len(prompts)) for _ in range(num_images)]
        rows = min(batch_size, len(jobs))
        shape = (self.latent, self.latent, self.latent_channels)
        chunks, compile_s, t0 = [], 0.0, time.perf_counter()
        starts = range(0, len(jobs), rows)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=len(starts) < 2):
            idx = list(range(start, min(start + rows, len(jobs))))
            padded = idx + [idx[-1]] * (rows - len(idx))
            keys = jax.vmap(jax.random.key)(np.asarray([seed + j for j in padded]))
            noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
            prompt_rows = np.asarray([jobs[j] for j in padded])
            out = self.sampler(
                refs,
                tokens.input_ids[prompt_rows],
                tokens.slots[prompt_rows],
                self.empty_ids,
                noise,
                jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys),
                num_words=m,
                guidance=guidance,
                spec=spec,
                init_images=init,
                **knobs,
            )
            chunks.append(np.asarray(out)[: len(idx)])
            compile_s += self.sampler.last_compile_s
        run_s = time.perf_counter() - t0 - compile_s
        images = (np.concatenate(chunks) * 255).round().astype(np.uint8)
        target = reference_descriptor(records)
        similarity = [identity_of(img, target) for img in images] if identity else []
        metadata = {
            "prompts": [prompts[p] for p in jobs],
            "seeds": [seed + j for j in range(len(jobs))],
            "references": [r.source for r in records],
            "num_words": m,
            "steps": steps,
            "eta": eta,
            "strength": strength,
            "guidance": guidance,
            "uncond": uncond,
            **knobs,
            "batch_size": rows,
            "resolution": int(images.shape[1]),
            "identity_similarity": similarity,
            "timings": {
                "compile_s": round(compile_s, 3),
                "run_s": round(run_s, 3),
                "s_per_image": round(run_s / len(jobs), 4),
            },
        }
        return SampleResult(images, records, metadata)


def pipeline_from_args(args) -> tuple[PhotoVersePipeline, str]:
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


def _find_base_folder(folder: str, workdir) -> str:
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
    from pv_jax.train import sharding
    from pv_jax.train.checkpoint import Checkpointer
    from pv_jax.train.trainer import build_bundle

    workdir = run_path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{workdir} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    ckpt = Checkpointer(workdir, every=1, keep=1_000_000)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
        cfg = ml_collections.ConfigDict(ckpt.saved_config(step))
        if sd_folder:
            cfg.base.sd_folder = sd_folder
        if clip_vision_folder:
            cfg.base.clip_vision_folder = clip_vision_folder
        for field in ("sd_folder", "clip_vision_folder"):
            cfg.base[field] = _find_base_folder(cfg.base[field], workdir)
        if model_overrides:
            cfg.model.update(model_overrides)
        bundle = build_bundle(cfg, face_net=False)  # sampling needs no face net (not saved)
        graphdef, trainable, frozen = split_trainable(bundle.model)
        mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
        shardings = jax.tree.map(lambda _: sharding.replicated(mesh), trainable)
        weights, _ = ckpt.restore_weights(step, trainable, shardings, ema=use_ema)
    except ValueError as e:
        raise CheckpointMismatchError(
            f"checkpoint {workdir} step {step} does not fit the base model built from its "
            f"config (sd_folder={cfg.base.sd_folder!r}, kind={cfg.base.kind!r}): {e}. Load it "
            "onto the SD / CLIP folders it was trained with."
        ) from e
    finally:
        ckpt.close()
    bundle.model = nnx.merge(graphdef, weights, frozen)
    return bundle
