"""PhotoVerse settings: every paper fact and every open choice of SPEC.md, as config fields.

Fields marked [paper] are the paper's values; [ours] are our decisions (SPEC.md), kept as
options. ``PhotoVerseConfig.from_dict`` accepts the ``model`` part of an ml_collections config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TEXT_INPUTS = ("cls", "cls_mean")
IMAGE_TOKENS = ("all", "patches", "cls")
LORA_TARGETS = ("q", "k", "v", "out")
MISSING_PLACEHOLDER = ("error", "append")
IMAGE_BRANCH_INIT = ("copy", "random", "zero")
IMAGE_SOURCES = ("encoder", "identity", "both")
DESCRIPTOR_DIM = 128  # dlib's face descriptor


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """One adapter: ``blocks`` x (Linear(->hidden) + LayerNorm + LeakyReLU), then a projection."""

    hidden: int = 1024  # [paper]
    blocks: int = 2  # [paper]
    negative_slope: float = 0.01  # LeakyReLU slope (PyTorch's default) [ours]
    layer_norm_eps: float = 1e-5  # [ours]


@dataclasses.dataclass(frozen=True)
class PhotoVerseConfig:
    """The PhotoVerse conditioning, its training options and its loss weights."""

    # Text branch: m pseudo-words from m CLIP-vision hidden states, deepest first.
    placeholder: str = "S*"  # [paper]
    text_layers: tuple[int, ...] = (24, 4, 8, 12, 16)  # hidden_states indices [ours]
    text_input: str = "cls"  # "cls" or "cls_mean" (CLS concatenated with mean patch) [ours]
    missing_placeholder: str = "error"  # or "append" ``append_text`` to the prompt [ours]
    append_text: str = "a photo of S*"
    # Image branch: image tokens f from one CLIP-vision hidden state.
    image_layer: int = -2  # penultimate hidden state [ours]
    image_tokens: str = "all"  # "all" (CLS + patches), "patches" or "cls" [ours]
    adapter: AdapterConfig = AdapterConfig()
    # What the image branch reads: "encoder" [paper] (the image adapter on the CLIP-vision
    # tokens); "identity" [ours]: ``identity_tokens`` tokens from the reference's dlib face
    # descriptor (IP-Adapter-FaceID's projection: MLP to N tokens + LayerNorm; dlib's weights
    # are CC0); "both": the two token sets side by side.
    image_source: str = "encoder"
    identity_tokens: int = 4
    # UNet cross-attention: LoRA on the text keys/values and the image key/value branch.
    lora_rank: int = 8  # [ours]
    lora_targets: tuple[str, ...] = ("k", "v")  # [paper]; "q" and "out" optional
    # W_k^S, W_v^S start as W_k, W_v [ours]; "random"; "zero": W_k^S = W_k, W_v^S = 0, so the
    # image branch starts silent and the model starts as its base (ControlNet's zero init).
    image_branch_init: str = "copy"
    # Inference knobs [paper]: number of pseudo-words, branch weights, LoRA scale.
    num_words: int | None = None  # m at inference; None = len(text_layers)
    gamma: float = 1.0
    sigma: float = 1.0
    alpha: float = 1.0
    # Random fusion in training [paper]: u < low -> (fused_max, 0); u > high -> (0, fused_max).
    fusion_low: float = 1.0 / 3.0
    fusion_high: float = 2.0 / 3.0
    fusion_max: float = 2.0
    # Losses [paper]: L = L_diff + w_face L_face + w_treg L_Treg + w_sreg L_Sreg.
    face_weight: float = 0.01
    text_reg_weight: float = 0.01
    image_reg_weight: float = 0.001
    t_face_max: int = 500  # face loss only where t <= t_face_max [ours]
    # The face loss decodes only a sub-batch of round(B * fraction) samples, those of smallest t
    # [ours]. None: the paper's expected share P(t <= t_face_max); t is then drawn stratified so
    # that its distribution stays uniform and the face-loss samples fit the sub-batch. 1.0:
    # every sample, t drawn i.i.d. (the plain reading of the paper, at twice the cost).
    face_batch_fraction: float | None = None
    # ... and, below 1.0, only a square latent window around each face, of this fraction of the
    # latent side (0.625: 40 of 64 latents at 512 px holds dlib's chip with a margin of 3-7
    # latents on real faces, and brings the face branch from 61% to 24% of the step's FLOPs).
    # Off by default: the window's descriptors differ from the whole decode's (cosine 0.92-0.99,
    # docs/BENCHMARKS.md) [ours].
    face_window: float = 1.0
    # The face loss's x0: 1 is the paper's single-step estimate from x_t; K > 1 runs a K-step
    # DDIM rollout from x_t to 0 with the model itself (the first step is the training
    # prediction; gradients flow through every step, each rematerialised) [ours; PuLID].
    face_rollout_steps: int = 1
    text_encoder_layer: int = -1  # UNet context: final LN of this hidden state (SD: last)

    def __post_init__(self):
        _choice("text_input", self.text_input, TEXT_INPUTS)
        _choice("image_tokens", self.image_tokens, IMAGE_TOKENS)
        _choice("missing_placeholder", self.missing_placeholder, MISSING_PLACEHOLDER)
        _choice("image_branch_init", self.image_branch_init, IMAGE_BRANCH_INIT)
        _choice("image_source", self.image_source, IMAGE_SOURCES)
        if self.uses_identity and self.identity_tokens < 1:
            raise ValueError(
                f"image_source={self.image_source!r} needs identity_tokens >= 1, "
                f"got {self.identity_tokens}"
            )
        if self.face_rollout_steps < 1:
            raise ValueError(
                f"face_rollout_steps must be >= 1 (1: the paper's one-step x0), "
                f"got {self.face_rollout_steps}"
            )
        for t in self.lora_targets:
            _choice("lora_targets", t, LORA_TARGETS)
        if not self.text_layers:
            raise ValueError("text_layers must name at least one CLIP-vision hidden state")
        if not self.placeholder.strip():
            raise ValueError("placeholder must be a non-empty token such as 'S*'")
        if self.missing_placeholder == "append" and self.placeholder not in self.append_text:
            raise ValueError(
                f"append_text {self.append_text!r} must contain the placeholder "
                f"{self.placeholder!r}"
            )
        if self.num_words is not None and not 1 <= self.num_words <= len(self.text_layers):
            raise ValueError(
                f"num_words must be in 1..{len(self.text_layers)} (one per text layer), "
                f"got {self.num_words}"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.face_batch_fraction is not None and not 0.0 < self.face_batch_fraction <= 1.0:
            raise ValueError(
                f"face_batch_fraction must be in (0, 1] (or None), got {self.face_batch_fraction}"
            )
        if not 0.0 < self.face_window <= 1.0:
            raise ValueError(f"face_window must be in (0, 1], got {self.face_window}")
        if not 0.0 <= self.fusion_low <= self.fusion_high <= 1.0:
            raise ValueError("random fusion needs 0 <= fusion_low <= fusion_high <= 1")

    @property
    def uses_identity(self) -> bool:
        """Whether the image branch reads the reference's face descriptor."""
        return self.image_source != "encoder"

    @property
    def words(self) -> int:
        """m: pseudo-words used at inference (all trained ones unless lowered)."""
        return self.num_words or len(self.text_layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhotoVerseConfig:
        """Build from a plain dict (e.g. ``config.model.to_dict()``); unknown keys are errors."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown PhotoVerse config fields {unknown}; known: {sorted(names)}")
        if isinstance(d.get("adapter"), dict):
            d["adapter"] = AdapterConfig(**d["adapter"])
        for k in ("text_layers", "lora_targets"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly dict (inverse of :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {list(options)}")
