"""The web app's request handling, apart from the UI (no gradio here: tests call it directly).

    app = PhotoVerseApp(PhotoVersePipeline.from_checkpoint(ckpt), model="...")
    response = app.generate(["me.jpg"], "a photo of S* as an astronaut", app.options(seed=3))
    response.ok, response.message       # False: the message names the input and the fix
    response.images, response.captions  # one caption per image: seed and identity similarity
    response.faces                      # per photo: the detected face crop beside its mask
    response.details                    # identity_similarity, seeds, settings, timings

Every problem with the input (no photo, too many, too large in bytes or megapixels, unreadable,
no face, a prompt without ``S*``, a setting out of range) comes back as ``ok=False`` with a
message; nothing else is caught. Photos are checked from the cheapest test up: the file size,
then the image header (format and pixel count, before any pixel is decoded), then decoding and
face detection. The pipeline is loaded once and its sampler compiles once per shape (number of
photos, images per batch, steps, m, img2img or not); ``details["timings"]`` says whether this
request compiled a program.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pv_jax.data.preprocess import FaceRecord, PreprocessConfig
from pv_jax.errors import InputError, PromptError, ReferencePhotoError
from pv_jax.face.references import identity_of, load_reference, photo_advice, reference_descriptor
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.photoverse.placeholder import has_placeholder
from pv_jax.sampling.options import SamplingOptions
from pv_jax.sampling.pipeline import PhotoVersePipeline

# What the page offers one click away: the toy model's own captions (pv_jax.toy.attributes) and
# two of the paper's.
EXAMPLE_PROMPTS = (
    "a photo of S*",
    "a grayscale photo of S*",
    "a photo of S* in red light",
    "a photo of S* in blue light",
    "a photo of S* as an astronaut",
    "an oil painting of S*",
)

Progress = Callable[..., Any]  # progress(fraction, desc=...), as gradio's gr.Progress


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the request is refused with a message."""

    max_photos: int = 4  # photos of one person per request
    max_upload_mb: float = 20.0  # size of one photo file, in MiB (2**20 bytes, as gradio counts)
    max_megapixels: float = 40.0  # pixels of one photo, read from its header
    max_images: int = 8  # images per request
    max_steps: int = 100  # DDIM steps


@dataclasses.dataclass
class Response:
    """What the page shows of one request."""

    ok: bool
    message: str  # the summary, or what was wrong and how to fix it
    images: list[np.ndarray] = dataclasses.field(default_factory=list)  # (H, W, 3) uint8
    captions: list[str] = dataclasses.field(default_factory=list)
    faces: list[tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)  # tile, caption
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


def image_branch_text(cfg: PhotoVerseConfig) -> str:
    """What a model's image branch reads, in the page's words."""
    ids = f"{cfg.identity_tokens} identity tokens from the face's dlib descriptor [ours]"
    return {
        "encoder": "the image encoder's tokens of the face crop (the paper's)",
        "identity": ids,
        "both": f"the image encoder's tokens of the face crop and {ids}",
    }[cfg.image_source]


def _name(path: str | os.PathLike) -> str:
    """A photo as the user knows it: the uploaded file's name, not the server's temp path."""
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def check_photo_file(path: str | os.PathLike, limits: Limits) -> None:
    """The cheap checks of one uploaded photo, before any pixel is decoded: it exists, its size
    in bytes, that its header is an image's, and its pixel count (InputError naming the fix)."""
    name = _name(path)
    if not os.path.isfile(path):
        raise ReferencePhotoError(f"photo {name} did not arrive: upload it again")
    mb = os.path.getsize(path) / 2**20
    if mb > limits.max_upload_mb:
        raise ReferencePhotoError(
            f"photo {name} is {mb:.1f} MB, over this server's limit of {limits.max_upload_mb:g} "
            "MB: save it as a JPEG or downscale it, and upload it again"
        )
    too_large = (
        f"over this server's limit of {limits.max_megapixels:g}: downscale it (a face of 200 px "
        "is plenty) and upload it again"
    )
    try:
        with Image.open(path) as image:  # reads the header only
            w, h = image.size
    except Image.DecompressionBombError as e:  # PIL's own limit, far above ours
        raise ReferencePhotoError(f"photo {name} has too many pixels ({e}), {too_large}") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ReferencePhotoError(
            f"photo {name} could not be read as an image ({type(e).__name__}): upload a JPEG or "
            "PNG photo"
        ) from e
    if w * h > limits.max_megapixels * 1e6:
        raise ReferencePhotoError(
            f"photo {name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, {too_large}"
        )


def face_tile(record: FaceRecord) -> np.ndarray:
    """The detected face crop (background masked, as the model sees it) beside its mask."""
    mask = np.repeat(record.reference_mask[..., None] * 255, 3, axis=-1).astype(np.uint8)
    return np.concatenate([record.reference, mask], axis=1)


class PhotoVerseApp:
    """A loaded pipeline and the settings of the page; :meth:`generate` serves one request."""

    def __init__(
        self,
        pipe: PhotoVersePipeline,
        *,
        defaults: SamplingOptions | None = None,
        limits: Limits = Limits(),
        model: str = "",
        load_s: float = 0.0,
    ):
        self.pipe = pipe
        self.limits = limits
        self.model = model
        self.load_s = load_s
        self.config = pipe.bundle.config
        # The knobs the page starts from: the model config's gamma, sigma, alpha and m.
        knobs = {k: getattr(self.config, k) for k in ("gamma", "sigma", "alpha")}
        base = defaults or pipe.defaults.replace(num_images=4)  # a run's tuned settings
        self.defaults = base.replace(
            **{k: v for k, v in knobs.items() if getattr(base, k) is None},
            num_words=base.num_words or self.config.words,
            missing_placeholder=base.missing_placeholder or "error",
        )
        self.requests = 0
        self._count = threading.Lock()
        self._shapes: set[tuple] = set()  # those sampled so far (for the progress message)
        self._shapes_lock = threading.Lock()  # concurrent requests (--concurrency > 1)

    def _shape(self, photos: int, options: SamplingOptions) -> tuple:
        """What the sampler compiles for: photos, images per call, m, steps/eta/img2img."""
        m = options.num_words or self.config.words
        return photos, min(options.batch_size, options.num_images), m, options.spec

    @property
    def max_words(self) -> int:
        """m can go up to the pseudo-words the model was trained with."""
        return len(self.config.text_layers)

    def options(self, **form) -> SamplingOptions:
        """The defaults with the form's values (numbers as a form sends them: floats for
        integer fields too); checked (InputError)."""
        ints = ("num_images", "seed", "steps", "num_words", "face_index", "batch_size")
        floats = ("guidance", "eta", "strength", "gamma", "sigma", "alpha")
        changes = {}
        for k, v in form.items():
            if v is None:
                continue
            try:
                changes[k] = int(round(float(v))) if k in ints else float(v) if k in floats else v
            except (TypeError, ValueError) as e:
                raise InputError(f"{k} must be a number, got {v!r}") from e
        return self.defaults.replace(**changes)

    def _check(self, photos: Sequence, prompt: str, options: SamplingOptions) -> None:
        """Everything that needs neither decoding nor the model."""
        if not photos:
            raise ReferencePhotoError(
                f"no photo given: upload 1 to {self.limits.max_photos} photos of one person"
            )
        if len(photos) > self.limits.max_photos:
            raise ReferencePhotoError(
                f"{len(photos)} photos given: upload at most {self.limits.max_photos} (all of one "
                "person)"
            )
        placeholder = self.config.placeholder
        if not prompt or not prompt.strip():
            raise PromptError(
                f"the prompt is empty: type one with {placeholder} where the person goes, e.g. "
                f"'a photo of {placeholder} as an astronaut'"
            )
        if options.missing_placeholder != "append" and not has_placeholder(prompt, placeholder):
            raise PromptError(
                f"the prompt {prompt!r} has no {placeholder}: put {placeholder} where the person "
                f"goes, e.g. 'a photo of {placeholder} as an astronaut'"
            )
        if options.num_images > self.limits.max_images:
            raise InputError(
                f"{options.num_images} images asked for: this server draws at most "
                f"{self.limits.max_images} per request"
            )
        if options.steps > self.limits.max_steps:
            raise InputError(
                f"{options.steps} steps asked for: this server runs at most "
                f"{self.limits.max_steps} (25 is the usual)"
            )
        m = options.num_words or self.config.words
        if m > self.max_words:
            raise InputError(
                f"m = {m}: this model was trained with {self.max_words} "
                f"pseudo-words; choose m from 1 to {self.max_words}"
            )
        for path in photos:
            check_photo_file(path, self.limits)

    def _faces(self, photos: Sequence, options: SamplingOptions, progress: Progress):
        """Each photo's face record (decoded and detected); errors name the uploaded file."""
        config = PreprocessConfig(max_megapixels=self.limits.max_megapixels)
        records = []
        for i, path in enumerate(photos):
            progress(0.05 + 0.15 * i / len(photos), desc=f"finding the face in photo {i + 1}")
            try:
                records.append(load_reference(path, config, face_index=options.face_index))
            except ReferencePhotoError as e:
                if e.reason is None:
                    raise
                # The page's words: the upload's name, and its knob for the face index.
                advice = photo_advice(e.reason, e.detail, face_index="the face index knob")
                raise ReferencePhotoError(
                    f"photo {_name(path)}: {advice}",
                    photo=_name(path),
                    reason=e.reason,
                    detail=e.detail,
                ) from e
        return records

    def generate(
        self,
        photos: Sequence[str | os.PathLike],
        prompt: str,
        options: SamplingOptions | None = None,
        progress: Progress | None = None,
    ) -> Response:
        """Images of the person in ``photos`` (file paths, one to four) for ``prompt``; any
        input error is a Response with ``ok=False`` and the message."""
        if progress is None:  # (not `progress or ...`: gradio's Progress has a len, 0 at first)
            progress = lambda *a, **k: None
        with self._count:
            self.requests += 1
            number = self.requests
        t0 = time.perf_counter()
        try:
            options = options or self.defaults
            self._check(photos, prompt, options)
            records = self._faces(photos, options, progress)
            t_faces = time.perf_counter()
            shape = self._shape(len(records), options)
            with self._shapes_lock:
                new = shape not in self._shapes
            compiling = "compiling the sampler for this new shape, then " if new else ""
            progress(0.25, desc=f"{compiling}sampling {options.num_images} images")
            result = self.pipe(records, [prompt], options, identity=False)
            t_sample = time.perf_counter()
        except InputError as e:
            return Response(ok=False, message=str(e), details={"request": number})
        with self._shapes_lock:
            self._shapes.add(shape)
        descriptor = reference_descriptor(records)
        similarity = []
        for i, image in enumerate(result.images):
            progress(0.8 + 0.2 * i / len(result.images), desc=f"identity of image {i + 1}")
            similarity.append(identity_of(image, descriptor))
        total = time.perf_counter() - t0
        meta = result.metadata
        timings = {
            "faces_s": round(t_faces - t0, 3),
            **meta["timings"],  # compiled (programs this request compiled), compile_s, run_s, ...
            "identity_s": round(time.perf_counter() - t_sample, 3),
            "total_s": round(total, 3),
            "programs": self.pipe.sampler.traces,  # compiled since start-up
            "load_s": round(self.load_s, 3),  # the model load at start-up
        }
        faces = [
            (face_tile(r), self._face_caption(path, r))
            for path, r in zip(photos, records, strict=True)
        ]
        details = {
            "request": number,
            "identity_similarity": [None if s is None else round(s, 4) for s in similarity],
            "seeds": meta["seeds"],
            "prompt": prompt,
            "faces": [caption for _, caption in faces],
            **{k: meta[k] for k in ("steps", "guidance", "strength", "num_words")},
            **{k: meta[k] for k in ("gamma", "sigma", "alpha", "resolution", "image_source")},
            "timings": timings,
        }
        captions = [
            f"seed {seed} · identity {s:.3f}" if s is not None else f"seed {seed} · no face found"
            for seed, s in zip(meta["seeds"], similarity, strict=True)
        ]
        progress(1.0, desc="done")
        return Response(
            ok=True,
            message=self._summary(similarity, timings),
            images=list(result.images),
            captions=captions,
            faces=faces,
            details=details,
        )

    @staticmethod
    def _face_caption(path, record: FaceRecord) -> str:
        which = (
            f"face {record.face_index + 1} of {record.num_faces} (by size)"
            if record.num_faces > 1
            else "one face"
        )
        return f"{_name(path)}: {which}; crop and {record.mask_source} mask"

    @staticmethod
    def _summary(similarity: list[float | None], t: dict) -> str:
        found = [s for s in similarity if s is not None]
        identity = (
            f"identity similarity {np.mean(found):.3f} (mean over the {len(found)} of "
            f"{len(similarity)} images where a face was found)"
            if found
            else f"no face found in the {len(similarity)} images, so no identity similarity"
        )
        if t["compiled"]:
            compile_text = (
                f"compile {t['compile_s']:.1f} s (a new shape: {t['compiled']} program compiled)"
            )
        else:
            compile_text = "compile 0 s (the compiled sampler was reused)"
        return (
            f"{len(similarity)} images in {t['total_s']:.1f} s: faces {t['faces_s']:.1f} s, "
            f"{compile_text}, sampling {t['run_s']:.1f} s ({t['s_per_image']:.2f} s/image), "
            f"identity {t['identity_s']:.1f} s. {identity}."
        )
