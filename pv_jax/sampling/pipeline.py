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
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from pv_jax.data.preprocess import (
    FaceRecord,
)
from pv_jax.errors import (
    InputError,
    PromptError,
    ReferencePhotoError,
)
from pv_jax.face.references import (
    identity_of,
    load_reference,
    reference_descriptor,
)
from pv_jax.photoverse import PhotoVerseBundle
from pv_jax.photoverse.placeholder import PromptTokens
from pv_jax.run_checkpoint import load_trained
from pv_jax.sampling.options import SamplingOptions
from pv_jax.sampling.sampler import Sampler, empty_prompt_ids
from pv_jax.sampling.tuned import tuned_path, tuned_settings

# The reference photo helpers live in pv_jax.face.references, the run loader in
# pv_jax.run_checkpoint and the command-line helpers in pv_jax.sampling.cli.


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
