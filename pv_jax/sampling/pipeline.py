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
from pv_jax.photoverse import PhotoVerseBundle, split_trainable
from pv_jax.sampling.sampler import Sampler, SamplerSpec


class ReferencePhotoError(ValueError):
    """A reference photo that cannot be used (no face, unreadable); names the file and the fix."""


class CheckpointMismatchError(ValueError):
    """A training checkpoint that does not fit the base model it is loaded onto."""


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


def identity_of(image: np.ndarray, reference: FaceRecord) -> float | None:
    """Cosine between dlib descriptors of the largest face in ``image`` and the reference's
    target crop; None when no face is found (e.g. untrained weights)."""
    try:
        box, _ = detect_largest_face(image, PreprocessConfig(upsample=1))
    except SkipError:
        return None
    desc = target_descriptor(image, face_landmarks(image, box), 0)
    ref = reference.descriptor
    return float(desc @ ref / (np.linalg.norm(desc) * np.linalg.norm(ref) + 1e-12))


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
        num_words: int | None = None,
        gamma: float | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        identity: bool = True,
    ) -> SampleResult:
        """``num_images`` images per prompt of the person in ``references``."""
        cfg = self.bundle.config
        m = num_words or cfg.words
        knobs = dict(
            gamma=cfg.gamma if gamma is None else gamma,
            sigma=cfg.sigma if sigma is None else sigma,
            alpha=cfg.alpha if alpha is None else alpha,
        )
        if not references:
            raise ReferencePhotoError("no reference photo given: pass at least one (--ref PHOTO)")
        tokens = self.bundle.tokenizer(list(prompts), m)  # a prompt without S* fails here
        records = [load_reference(r) for r in references]
        refs = np.stack([r.reference for r in records])
        spec = SamplerSpec(steps=steps, eta=eta)
        images, seeds, timings = [], [], {"compile_s": 0.0, "run_s": 0.0}
        jobs = [(p, i) for p in range(len(prompts)) for i in range(num_images)]
        for p, _ in tqdm(jobs, desc="sampling", unit="image", disable=len(jobs) < 2):
            s = seed + len(images)
            shape = (1, self.latent, self.latent, self.latent_channels)
            noise = jax.random.normal(jax.random.key(s), shape)
            t0 = time.perf_counter()
            traces = self.sampler.traces
            out = self.sampler(
                refs,
                tokens.input_ids[p : p + 1],
                tokens.slots[p : p + 1],
                self.empty_ids,
                noise,
                jax.random.fold_in(jax.random.key(s), 1),
                num_words=m,
                guidance=guidance,
                spec=spec,
                **knobs,
            )
            out = np.asarray(jax.block_until_ready(out))
            key = "compile_s" if self.sampler.traces > traces else "run_s"
            timings[key] += time.perf_counter() - t0
            images.append((out[0] * 255).round().astype(np.uint8))
            seeds.append(s)
        images = np.stack(images)
        similarity = [identity_of(img, records[0]) for img in images] if identity else []
        metadata = {
            "prompts": [prompts[p] for p, _ in jobs],
            "seeds": seeds,
            "references": [r.source for r in records],
            "num_words": m,
            "steps": steps,
            "eta": eta,
            "guidance": guidance,
            **knobs,
            "resolution": int(images.shape[1]),
            "identity_similarity": similarity,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        return SampleResult(images, records, metadata)


def load_trained(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    sd_folder: str | None = None,
    clip_vision_folder: str | None = None,
    use_ema: bool = True,
    model_overrides: dict | None = None,
) -> PhotoVerseBundle:
    """The PhotoVerse of a training run with its trained weights (EMA ones if kept)."""
    from pv_jax.train import sharding
    from pv_jax.train.checkpoint import Checkpointer
    from pv_jax.train.step import TrainState
    from pv_jax.train.trainer import build_bundle, make_optimizer_from_config

    workdir = Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{workdir} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    ckpt = Checkpointer(workdir, every=1, keep=1_000_000)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no finished checkpoint")
    cfg = ml_collections.ConfigDict(ckpt.saved_config(step))
    if sd_folder:
        cfg.base.sd_folder = sd_folder
    if clip_vision_folder:
        cfg.base.clip_vision_folder = clip_vision_folder
    if model_overrides:
        cfg.model.update(model_overrides)
    bundle = build_bundle(cfg)
    graphdef, trainable, frozen = split_trainable(bundle.model)
    host = TrainState.create(trainable, make_optimizer_from_config(cfg), cfg.train.ema_decay > 0)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), host)
    try:
        ckpt.check_shapes(step, host)
        state = ckpt.restore(step, host, shardings)
    except ValueError as e:
        raise CheckpointMismatchError(
            f"checkpoint {workdir} step {step} does not fit the base model built from its "
            f"config (sd_folder={cfg.base.sd_folder!r}, kind={cfg.base.kind!r}): {e}. Load it "
            "onto the SD / CLIP folders it was trained with."
        ) from e
    finally:
        ckpt.close()
    weights = state.ema if (use_ema and state.ema is not None) else state.trainable
    bundle.model = nnx.merge(graphdef, weights, frozen)
    return bundle
