"""The sampling options in one place: the dataclass the pipeline takes, and the flags of the
command lines (``sample.py``, ``python -m pv_jax.evaluation``) that fill it.

    options = SamplingOptions(steps=50, guidance=5.0)        # checked here (InputError)
    pipe(["me.jpg"], ["a photo of S*"], options)              # or pipe(..., steps=50, ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence

from pv_jax.errors import InputError, PromptError
from pv_jax.photoverse.config import MISSING_PLACEHOLDER, PhotoVerseConfig
from pv_jax.photoverse.placeholder import has_placeholder, missing_placeholder_error
from pv_jax.sampling.sampler import UNCOND_MODES, SamplerSpec
from pv_jax.sampling.tuned import TUNABLE, TUNED_FILE, tuned_settings

# What a command line's prompt error tells the user to do.
APPEND_FLAG = "pass --missing-placeholder append"


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Every setting of one sampling call; the values are checked on creation (InputError)."""

    num_images: int = 1  # images per prompt
    seed: int = 0  # image j (prompt-major order) uses seed + j, whatever its batch
    steps: int = 25  # DDIM steps
    guidance: float = 7.5  # classifier-free guidance scale
    eta: float = 0.0  # DDIM eta (0: deterministic)
    strength: float = 1.0  # < 1: img2img from the first reference's target crop
    uncond: str = "base"  # guidance's unconditional pass: frozen "base" or trained "lora"
    batch_size: int = 4  # images per sampler call (the last batch is padded)
    num_words: int | None = None  # m pseudo-words; None: all trained
    gamma: float | None = None  # text branch weight; None: the model config's
    sigma: float | None = None  # image branch weight; None: the model config's
    alpha: float | None = None  # LoRA scale; None: the model config's
    face_index: int = 0  # which face of each reference photo, by size (0: the largest)
    missing_placeholder: str | None = None  # "error" / "append"; None: the model config's

    def __post_init__(self):
        self.spec  # noqa: B018 (building it checks steps, eta, strength and uncond)
        for name in ("num_images", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_words is not None and self.num_words < 1:
            raise InputError(f"num_words must be >= 1, got {self.num_words}")
        if self.face_index < 0:
            raise InputError(
                f"face_index must be >= 0 (0: the largest face), got {self.face_index}"
            )
        if self.missing_placeholder not in (None, *MISSING_PLACEHOLDER):
            raise InputError(
                f"missing_placeholder must be one of {MISSING_PLACEHOLDER}, got "
                f"{self.missing_placeholder!r}"
            )

    @property
    def spec(self) -> SamplerSpec:
        """What the sampler's compilation depends on."""
        return SamplerSpec(
            steps=self.steps, eta=self.eta, strength=self.strength, uncond=self.uncond
        )

    def replace(self, **changes) -> SamplingOptions:
        """A copy with ``changes`` (field names; checked again)."""
        return dataclasses.replace(self, **changes)


_HELP = {
    "num_images": "images per prompt",
    "seed": "image j uses seed + j",
    "steps": "DDIM steps",
    "guidance": "classifier-free guidance scale",
    "eta": "DDIM eta (0: deterministic)",
    "strength": "below 1: start from the reference's noised crop (img2img); 1: from pure noise",
    "uncond": "guidance's unconditional pass: the frozen base model, or through the trained LoRA",
    "batch_size": "images per sampler call",
    "num_words": "m pseudo-words (default: all trained)",
    "gamma": "text branch weight (default: the model config's)",
    "sigma": "image branch weight (default: the model config's)",
    "alpha": "LoRA scale (default: the model config's)",
    "face_index": "which face of a photo with several, by size (0: the largest)",
    "missing_placeholder": "a prompt without S*: an error, or append ', a photo of S*'",
}
_CHOICES = {"uncond": UNCOND_MODES, "missing_placeholder": MISSING_PLACEHOLDER}
# The defaults of every model (no config changes them): the command lines check prompts with
# them before the model is loaded; the tokenizer checks again with the model's own.
_PLACEHOLDER, _APPEND_TEXT = PhotoVerseConfig.placeholder, PhotoVerseConfig.append_text


def add_sampling_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add a flag per :class:`SamplingOptions` field (``--num-images``, ...) to ``parser``;
    ``defaults`` overrides the dataclass defaults (e.g. ``num_images=4``). The :data:`TUNABLE`
    flags default to the run's tuned value (:func:`options_from_args`)."""
    group = parser.add_argument_group("sampling")
    # A command line asks for the error by default, so that it can check prompts before loading.
    defaults = {"missing_placeholder": "error", **defaults}
    hints = typing.get_type_hints(SamplingOptions)
    for field in dataclasses.fields(SamplingOptions):
        default = defaults.get(field.name, field.default)
        hint = hints[field.name]  # int, float, str or one of them | None
        kind = next(t for t in typing.get_args(hint) or [hint] if t is not type(None))
        help_text = _HELP[field.name]
        if field.name in TUNABLE:  # unset: the run's tuning.json, then the default
            help_text += f" (default: the run's {TUNED_FILE}, else " + (
                "the model config's)" if default is None else f"{default})"
            )
            if field.name in defaults:  # the command's own default, below the run's file
                parser.set_defaults(**{f"_default_{field.name}": defaults[field.name]})
            default = None
        elif default is not None:
            help_text += " (default: %(default)s)"
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=default,
            choices=_CHOICES.get(field.name),
            help=help_text,
        )


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    """The options of parsed :func:`add_sampling_args` flags (checked: InputError); a flag left
    unset takes the ``--ckpt`` run's tuned value (:func:`~pv_jax.sampling.tuned.tuned_settings`),
    then the command's own default, then the dataclass default."""
    names = [f.name for f in dataclasses.fields(SamplingOptions)]
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    own = {k: getattr(args, f"_default_{k}") for k in names if hasattr(args, f"_default_{k}")}
    ckpt = None if getattr(args, "tiny", False) else getattr(args, "ckpt", None)
    tuned = tuned_settings(ckpt) if ckpt else {}
    return SamplingOptions(**{**own, **tuned, **given})


def check_prompts(
    prompts: Sequence[str], options: SamplingOptions, placeholder: str = _PLACEHOLDER
) -> None:
    """Before any model is loaded: every prompt holds the placeholder unless the options append
    it; the error names the command line's flag."""
    if not prompts:
        raise PromptError("no prompt given: pass at least one (--prompt 'a photo of S* ...')")
    if options.missing_placeholder == "append":
        return
    for prompt in prompts:
        if not has_placeholder(prompt, placeholder):
            raise missing_placeholder_error(prompt, placeholder, _APPEND_TEXT, APPEND_FLAG)
