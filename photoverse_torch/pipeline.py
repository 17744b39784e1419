"""The PhotoVerse sampler in PyTorch over diffusers components (SD 1.x / 2.x and SDXL bases).

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

import contextlib
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
    each occurrence expanded to m slots holding BOS as a stand-in, padded to the model length.
    SDXL: ``tokenizer_2`` gives tower 2's ids, the same tokens padded with its own pad id."""

    def __init__(self, tokenizer, placeholder: str = "S*", max_length: int = 77, tokenizer_2=None):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.add_tokens([placeholder])
        self.tokenizer_2 = None
        if tokenizer_2 is not None:
            self.tokenizer_2 = copy.deepcopy(tokenizer_2)
            self.tokenizer_2.add_tokens([placeholder])
        self.placeholder, self.max_length = placeholder, max_length
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)

    def __call__(self, prompts: Sequence[str], m: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, slots), each (B, L) int64, slots holding k + 1 where S_(k+1) goes; with
        ``tokenizer_2`` also tower 2's ids (input_ids, slots, input_ids_2)."""
        t, n = self.tokenizer, self.max_length
        ids = torch.full((len(prompts), n), t.pad_token_id, dtype=torch.int64)
        ids_2 = None
        if self.tokenizer_2 is not None:
            ids_2 = torch.full_like(ids, self.tokenizer_2.pad_token_id)
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
            if ids_2 is not None:
                ids_2[b, : len(row)] = torch.tensor(row)
        return (ids, slots) if ids_2 is None else (ids, slots, ids_2)

    def plain(self, prompts: Sequence[str], tower: int = 1) -> torch.Tensor:
        """Ids of prompts without placeholder handling (the empty guidance prompt), for text
        tower 1 or (SDXL) 2."""
        tokenizer = self.tokenizer if tower == 1 else self.tokenizer_2
        out = tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True
        )
        return torch.tensor(out.input_ids, dtype=torch.int64)


class PhotoVerseTorchPipeline:
    """A pv_jax export on diffusers / transformers components (SDXL: with ``text_encoder_2``
    and ``tokenizer_2``)."""

    def __init__(
        self,
        *,
        unet,
        vae,
        text_encoder,
        tokenizer,
        image_encoder,
        scheduler,
        export,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.image_encoder, self.scheduler, self.export = image_encoder, scheduler, export
        self.text_encoder_2 = text_encoder_2
        self.is_xl = text_encoder_2 is not None
        if self.is_xl != bool(export.base.get("is_xl")):
            raise ValueError(
                f"the export was trained on {'an SDXL' if export.base.get('is_xl') else 'an SD'} "
                f"base, these components are {'SDXL' if self.is_xl else 'SD 1.x / 2.x'}: load "
                "the base the run trained on (its photoverse_base metadata)"
            )
        # SDXL base folders ask for zeros as the unconditional text input (model_index.json).
        self.force_zeros = self.is_xl and force_zeros_for_empty_prompt
        self.config = export.config
        self.tokenizer = PlaceholderTokenizer(
            tokenizer, self.config["placeholder"], tokenizer_2=tokenizer_2
        )
        self.adapters = PhotoVerseAdapters.from_export(export)
        install(unet, export)

    @classmethod
    def from_export(
        cls,
        path: str | os.PathLike,
        sd_folder: str | os.PathLike | None = None,
        clip_vision_folder: str | os.PathLike | None = None,
    ) -> PhotoVerseTorchPipeline:
        """Load the export and the base it names (or the folders given), fp32; an SDXL base
        brings its second text tower and tokenizer."""
        import json

        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModel,
        )

        export = read_export(str(path))
        sd = Path(sd_folder or export.base.get("sd_folder") or "")
        vision = Path(clip_vision_folder or export.base.get("clip_vision_folder") or "")
        for name, folder in (("sd_folder", sd), ("clip_vision_folder", vision)):
            if not (folder / "config.json").is_file() and not (folder / "unet").is_dir():
                raise ValueError(
                    f"{name} {str(folder)!r} (from the export's photoverse_base unless given) is "
                    f"not a model folder here: pass {name}= the base the run trained on"
                )
        f32 = torch.float32
        xl = {}
        if export.base.get("is_xl"):
            if not (sd / "text_encoder_2").is_dir():
                raise ValueError(
                    f"sd_folder {str(sd)!r} has no text_encoder_2/: the export was trained on "
                    "SDXL, pass sd_folder= an SDXL pipeline folder"
                )
            index = sd / "model_index.json"
            meta = json.loads(index.read_text()) if index.is_file() else {}
            xl = dict(
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                    sd / "text_encoder_2", dtype=f32
                ).eval(),
                tokenizer_2=CLIPTokenizer.from_pretrained(sd / "tokenizer_2"),
                force_zeros_for_empty_prompt=meta.get("force_zeros_for_empty_prompt", True),
            )
        return cls(
            unet=UNet2DConditionModel.from_pretrained(sd / "unet", torch_dtype=f32).eval(),
            vae=AutoencoderKL.from_pretrained(sd / "vae", torch_dtype=f32).eval(),
            text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder", dtype=f32).eval(),
            tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
            image_encoder=CLIPVisionModel.from_pretrained(vision, dtype=f32).eval(),
            scheduler=_scheduler(export, sd),
            export=export,
            **xl,
        )

    def _context(self, input_ids: torch.Tensor) -> torch.Tensor:
        layer = self.config["text_encoder_layer"]
        out = self.text_encoder(input_ids, output_hidden_states=layer != -1)
        if layer == -1:
            return out.last_hidden_state
        tower = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers < 5
        return tower.final_layer_norm(out.hidden_states[layer])

    def _xl_text(
        self, ids: torch.Tensor, ids_2: torch.Tensor, slots=None, words=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's context (B, L, D1 + D2) and pooled embedding (B, P): each tower's penultimate
        state (no final LayerNorm), with the pseudo-words (split at tower 1's width) injected
        when given."""
        width = self.text_encoder.config.hidden_size
        parts = (
            (None, None)
            if words is None
            else torch.split(words, [width, words.shape[-1] - width], -1)
        )
        states, pooled = [], None
        for tower, tower_ids, w in zip(
            (self.text_encoder, self.text_encoder_2), (ids, ids_2), parts, strict=True
        ):
            with contextlib.ExitStack() as stack:
                if w is not None:
                    stack.enter_context(inject_words(tower, slots, w))
                out = tower(tower_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled

    def _time_ids(self, b: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """SDXL's inference time ids (B, 6): original = target = the image size, crop (0, 0)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = (int(n) * factor for n in latent_hw)
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(b, 6)

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
        words_b, image_tokens = words.expand(b, -1, -1), tokens.expand(b, -1, -1)
        cond, uncond_text = self._text(prompt, b, m, words_b, tuple(noise.shape[-2:]))
        self.scheduler.set_timesteps(steps)
        x = noise.float()
        for i, t in enumerate(self.scheduler.timesteps):
            eps_c = self.unet(
                x, t, **cond, cross_attention_kwargs=knobs(image_tokens, gamma, sigma, alpha)
            ).sample
            if guidance == 1.0:
                eps = eps_c
            else:
                eps_u = self._uncond(x, t, uncond_text, uncond, gamma + sigma, alpha)
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

    def _text(
        self, prompt: str, b: int, m: int, words: torch.Tensor, latent_hw: tuple[int, int]
    ) -> tuple[dict, dict]:
        """The UNet's text keywords for the prompt with the pseudo-words ``words`` (B, m, D) and
        for the unconditional pass: the context, and on SDXL the pooled embedding and time ids."""
        if not self.is_xl:
            ids, slots = self.tokenizer([prompt] * b, m)
            with inject_words(self.text_encoder, slots, words):
                context = self._context(ids)
            uncond = self._context(self.tokenizer.plain([""] * b))
            return {"encoder_hidden_states": context}, {"encoder_hidden_states": uncond}
        ids, slots, ids_2 = self.tokenizer([prompt] * b, m)
        context, pooled = self._xl_text(ids, ids_2, slots, words)
        if self.force_zeros:
            u_context, u_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            empty = [""] * b
            u_context, u_pooled = self._xl_text(
                self.tokenizer.plain(empty), self.tokenizer.plain(empty, tower=2)
            )
        time_ids = self._time_ids(b, latent_hw)
        return tuple(
            {
                "encoder_hidden_states": c,
                "added_cond_kwargs": {"text_embeds": p, "time_ids": time_ids},
            }
            for c, p in ((context, pooled), (u_context, u_pooled))
        )

    def _uncond(self, x, t, text: dict, rule: str, text_weight: float, alpha: float):
        """The unconditional prediction: the frozen base (LoRA off, no image branch), or the
        trained LoRA at text weight gamma + sigma."""
        if rule == "base":
            self.unet.disable_lora()
            try:
                return self.unet(
                    x, t, **text, cross_attention_kwargs=knobs(None, 1.0, 0.0, 1.0)
                ).sample
            finally:
                self.unet.enable_lora()
        return self.unet(
            x, t, **text, cross_attention_kwargs=knobs(None, text_weight, 0.0, alpha)
        ).sample


def _scheduler(export: Export, sd: Path):
    """DDIM with the noise schedule the run trained with (the export records it: the folder's
    settings with pv_jax's SD defaults for any it omits, which diffusers' own defaults are
    not); an older export without it: the folder's scheduler."""
    from diffusers import DDIMScheduler

    if "scheduler" in export.base:
        return DDIMScheduler.from_config(export.base["scheduler"])
    return DDIMScheduler.from_pretrained(sd / "scheduler")


def export_defaults(export: Export) -> dict:
    """The run's tuned sampling settings recorded in the export (guidance, eta, steps...)."""
    return dict(export.sampling)
