"""The PhotoVerse sampler in PyTorch over diffusers components (SD 1.x / 2.x bases).

    pipe = PhotoVerseTorchPipeline.from_export("photoverse.safetensors")
    out = pipe(reference_crops, "a photo of S* as an astronaut", noise=latents, guidance=3.0)

The references are pv_jax's face crops (``FaceRecord.reference``: 224 px, background masked,
uint8) and, for identity tokens, their dlib descriptors. DDIM is diffusers' ``DDIMScheduler``
(what pv_jax's sampler equals), classifier-free guidance uses our unconditional rule: the empty
prompt through the frozen base (``uncond="base"``: no LoRA, no image branch) or through the
trained LoRA at text weight gamma + sigma (``"lora"``). The start noise is pv_jax's for the
given seeds (:mod:`photoverse_torch.jax_noise`), or an argument; with ``eta`` > 0 the variance
noise is ours too when the seeds are given (step by step, as pv_jax draws it), and comes from
``generator`` when the start noise is an argument.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from photoverse_torch.faces import Face, load_face
from photoverse_torch.jax_noise import start_noise, step_noise
from photoverse_torch.model import (
    Export,
    PhotoVerseAdapters,
    inject_words,
    install,
    knobs,
    preprocess_reference,
    read_export,
)


@dataclasses.dataclass
class TorchSample:
    """Images (B, H, W, 3) in [0, 1], the final latents (B, C, h, w), words and image tokens."""

    images: np.ndarray
    latents: torch.Tensor
    words: torch.Tensor
    image_tokens: torch.Tensor


class PlaceholderTokenizer:
    """pv_jax's placeholder tokenisation: the placeholder token added to the CLIP tokenizer,
    each occurrence expanded to m slots holding BOS as a stand-in, padded to the model length."""

    def __init__(self, tokenizer, placeholder: str = "S*", max_length: int = 77):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.add_tokens([placeholder])
        self.placeholder, self.max_length = placeholder, max_length
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)

    def __call__(self, prompts: Sequence[str], m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, slots), each (B, L) int64; slots hold k + 1 where S_(k+1) goes."""
        t, n = self.tokenizer, self.max_length
        ids = torch.full((len(prompts), n), t.pad_token_id, dtype=torch.int64)
        slots = torch.zeros((len(prompts), n), dtype=torch.int64)
        for b, prompt in enumerate(prompts):
            row, row_slots = [], []
            for i in t(prompt, truncation=False).input_ids:
                if i == self.placeholder_id:
                    row += [t.bos_token_id] * m
                    row_slots += range(1, m + 1)
                else:
                    row.append(i)
                    row_slots.append(0)
            if self.placeholder_id not in t(prompt, truncation=False).input_ids:
                raise ValueError(f"prompt {prompt!r} has no placeholder {self.placeholder!r}")
            if len(row) > n:
                if any(row_slots[n - 1 :]):
                    raise ValueError(f"prompt {prompt!r}: the 77-token limit cuts off S*")
                row, row_slots = row[: n - 1] + [t.eos_token_id], row_slots[: n - 1] + [0]
            ids[b, : len(row)] = torch.tensor(row)
            slots[b, : len(row)] = torch.tensor(row_slots)
        return ids, slots

    def plain(self, prompts: Sequence[str]) -> torch.Tensor:
        """Ids of prompts without placeholder handling (the empty guidance prompt)."""
        out = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        )
        return torch.tensor(out.input_ids, dtype=torch.int64)


class PhotoVerseTorchPipeline:
    """A pv_jax export on diffusers / transformers components."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, image_encoder, scheduler, export):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.image_encoder, self.scheduler, self.export = image_encoder, scheduler, export
        self.config = export.config
        self.tokenizer = PlaceholderTokenizer(tokenizer, self.config["placeholder"])
        self.adapters = PhotoVerseAdapters.from_export(export)
        install(unet, export)

    @classmethod
    def from_export(
        cls,
        path: str | os.PathLike,
        sd_folder: str | os.PathLike | None = None,
        clip_vision_folder: str | os.PathLike | None = None,
    ) -> PhotoVerseTorchPipeline:
        """Load the export and the base it names (or the folders given), fp32."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        export = read_export(str(path))
        if export.base.get("is_xl"):
            raise NotImplementedError("SDXL exports: not in photoverse_torch yet (issue 28)")
        sd = Path(sd_folder or export.base.get("sd_folder") or "")
        vision = Path(clip_vision_folder or export.base.get("clip_vision_folder") or "")
        for name, folder in (("sd_folder", sd), ("clip_vision_folder", vision)):
            if not (folder / "config.json").is_file() and not (folder / "unet").is_dir():
                raise ValueError(
                    f"{name} {str(folder)!r} (from the export's photoverse_base unless given) is "
                    f"not a model folder here: pass {name}= the base the run trained on"
                )
        f32 = torch.float32
        return cls(
            unet=UNet2DConditionModel.from_pretrained(sd / "unet", torch_dtype=f32).eval(),
            vae=AutoencoderKL.from_pretrained(sd / "vae", torch_dtype=f32).eval(),
            text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder", dtype=f32).eval(),
            tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
            image_encoder=CLIPVisionModel.from_pretrained(vision, dtype=f32).eval(),
            scheduler=DDIMScheduler.from_pretrained(sd / "scheduler"),
            export=export,
        )

    def _context(self, input_ids: torch.Tensor) -> torch.Tensor:
        layer = self.config["text_encoder_layer"]
        out = self.text_encoder(input_ids, output_hidden_states=layer != -1)
        if layer == -1:
            return out.last_hidden_state
        tower = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers < 5
        return tower.final_layer_norm(out.hidden_states[layer])

    @torch.no_grad()
    def __call__(
        self,
        references: np.ndarray | Sequence[str | os.PathLike | Face],
        prompt: str,
        *,
        noise: torch.Tensor | None = None,
        seeds: Sequence[int] | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        gamma: float | None = None,
        sigma: float | None = None,
        alpha: float | None = None,
        num_words: int | None = None,
        uncond: str = "base",
        eta: float = 0.0,
        descriptors: np.ndarray | None = None,
        generator: torch.Generator | None = None,
    ) -> TorchSample:
        """Images of the person in ``references``: photos (paths or :class:`Face` objects of
        :func:`~photoverse_torch.faces.load_face`, which also gives the descriptors) or (R, 224,
        224, 3) uint8 crops, averaged after the adapters as ours; one image per row of ``noise``
        (B, C, h, w), or per seed of ``seeds`` (pv_jax's noise for that seed, the start's and,
        with ``eta`` > 0, each step's: ``sample.py --seed S`` draws seeds S, S+1...)."""
        if (noise is None) == (seeds is None):
            raise ValueError("pass the start noise (noise=) or the seeds (seeds=), not both")
        if not isinstance(references, np.ndarray):  # photos: detect, crop, mask as pv_jax
            faces = [r if isinstance(r, Face) else load_face(r) for r in references]
            references = np.stack([f.reference for f in faces])
            if descriptors is None:
                descriptors = np.stack([f.descriptor for f in faces])
        latent, channels = self.unet.config.sample_size, self.unet.config.in_channels
        variance = None  # with seeds and eta > 0: pv_jax's variance noise, step by step
        if noise is None:
            noise = start_noise(list(seeds), latent, channels)
            if eta > 0:
                variance = step_noise(list(seeds), steps, latent, channels)
        cfg = self.config
        gamma = cfg["gamma"] if gamma is None else gamma
        sigma = cfg["sigma"] if sigma is None else sigma
        alpha = cfg["alpha"] if alpha is None else alpha
        m = num_words or len(cfg["text_layers"])
        size = self.image_encoder.config.image_size
        pixels = preprocess_reference(torch.from_numpy(np.asarray(references)), size)
        states = self.image_encoder(pixels, output_hidden_states=True).hidden_states
        descs = None if descriptors is None else torch.from_numpy(np.asarray(descriptors))
        words, tokens = self.adapters(states, m, descs)
        words, tokens = words.mean(0, keepdim=True), tokens.mean(0, keepdim=True)
        b = noise.shape[0]
        ids, slots = self.tokenizer([prompt] * b, m)
        with inject_words(self.text_encoder, slots, words.expand(b, -1, -1)):
            cond = self._context(ids)
        image_tokens = tokens.expand(b, -1, -1)
        uncond_ctx = self._context(self.tokenizer.plain([""] * b))
        self.scheduler.set_timesteps(steps)
        x = noise.float()
        for i, t in enumerate(self.scheduler.timesteps):
            eps_c = self.unet(
                x, t, cond, cross_attention_kwargs=knobs(image_tokens, gamma, sigma, alpha)
            ).sample
            if guidance == 1.0:
                eps = eps_c
            else:
                eps_u = self._uncond(x, t, uncond_ctx, uncond, gamma + sigma, alpha)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = self.scheduler.step(
                eps,
                t,
                x,
                eta=eta,
                generator=generator,
                variance_noise=None if variance is None else variance[i],
            ).prev_sample
        vae_cfg = self.vae.config
        raw = x / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
        images = (self.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
        return TorchSample(images.permute(0, 2, 3, 1).numpy(), x, words, tokens)

    def _uncond(self, x, t, context, rule: str, text_weight: float, alpha: float):
        """The unconditional prediction: the frozen base (LoRA off, no image branch), or the
        trained LoRA at text weight gamma + sigma."""
        if rule == "base":
            self.unet.disable_lora()
            try:
                return self.unet(
                    x, t, context, cross_attention_kwargs=knobs(None, 1.0, 0.0, 1.0)
                ).sample
            finally:
                self.unet.enable_lora()
        return self.unet(
            x, t, context, cross_attention_kwargs=knobs(None, text_weight, 0.0, alpha)
        ).sample


def export_defaults(export: Export) -> dict:
    """The run's tuned sampling settings recorded in the export (guidance, eta, steps...)."""
    return dict(export.sampling)
