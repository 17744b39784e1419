"""PhotoVerse's trained parts in PyTorch, read from a ``python -m pv_jax.export`` file.

    export = read_export("photoverse.safetensors")
    adapters = PhotoVerseAdapters.from_export(export)          # text / image / identity adapters
    words, tokens = adapters(vision(pixels, output_hidden_states=True).hidden_states, m, descs)
    install(unet, export)            # LoRA through PEFT + the dual-branch attention processors
    with inject_words(text_encoder, slots, words):
        context = text_encoder(input_ids).last_hidden_state
    unet(x, t, context, cross_attention_kwargs=knobs(image_tokens, gamma, sigma, alpha))

The networks mirror ``pv_jax.photoverse`` module for module, so the file's tensors load with a
strict ``load_state_dict``; no JAX is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "pv_jax.photoverse/1"
ADAPTER_PREFIX = "photoverse."
DESCRIPTOR_DIM = 128
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class Export:
    """A pv_jax export: its tensors (PyTorch layout) and the JSON parts of its metadata."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]  # the PhotoVerseConfig
    base: dict[str, Any]  # the base model the run trained on
    run: dict[str, Any]  # workdir, step, weights
    sampling: dict[str, Any]  # the run's tuned sampling settings


def read_export(path: str) -> Export:
    """The tensors and metadata of a pv_jax export; another file is a ValueError naming it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("pv_jax_format") != FORMAT:
            raise ValueError(
                f"{path} is not a pv_jax PhotoVerse export: write one with "
                "python -m pv_jax.export --ckpt RUN --out FILE"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    parts = ("photoverse_config", "photoverse_base", "photoverse_run", "photoverse_sampling")
    return Export(tensors, *(json.loads(metadata[k]) for k in parts))


class AdapterBlock(nn.Module):
    """Linear -> LayerNorm -> LeakyReLU."""

    def __init__(self, in_dim: int, hidden: int, eps: float, slope: float):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., hidden)."""
        return F.leaky_relu(self.norm(self.linear(x)), self.slope)


class Adapter(nn.Module):
    """``blocks`` adapter blocks, then a linear projection to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, cfg: dict[str, Any]):
        super().__init__()
        dims = [in_dim] + [cfg["hidden"]] * cfg["blocks"]
        eps, slope = cfg["layer_norm_eps"], cfg["negative_slope"]
        self.blocks = nn.ModuleList([AdapterBlock(d, cfg["hidden"], eps, slope) for d in dims[:-1]])
        self.proj = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for block in self.blocks:
            x = block(x)
        return self.proj(x)


class TextAdapter(nn.Module):
    """m per-layer adapters: CLIP-vision hidden states -> pseudo-words (B, m, text width)."""

    def __init__(self, cfg: dict[str, Any], vision_width: int, text_width: int):
        super().__init__()
        self.layer_ids = tuple(cfg["text_layers"])
        self.text_input = cfg["text_input"]
        in_dim = vision_width * (2 if self.text_input == "cls_mean" else 1)
        self.adapters = nn.ModuleList(
            [Adapter(in_dim, text_width, cfg["adapter"]) for _ in self.layer_ids]
        )

    def forward(self, hidden_states: Sequence[torch.Tensor], num_words: int) -> torch.Tensor:
        """The first ``num_words`` pseudo-words (deepest layers first)."""
        words = []
        for j in range(num_words):
            state = hidden_states[self.layer_ids[j]]
            x = state[:, 0]
            if self.text_input != "cls":
                x = torch.cat([x, state[:, 1:].mean(dim=1)], dim=-1)
            words.append(self.adapters[j](x))
        return torch.stack(words, dim=1)


class ImageAdapter(nn.Module):
    """One hidden state's tokens -> image tokens f (B, T, cross-attention width)."""

    def __init__(self, cfg: dict[str, Any], vision_width: int, context_width: int):
        super().__init__()
        self.layer_id, self.image_tokens = cfg["image_layer"], cfg["image_tokens"]
        self.adapter = Adapter(vision_width, context_width, cfg["adapter"])

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """CLIP-vision ``hidden_states`` -> (B, T, context width)."""
        state = hidden_states[self.layer_id]
        if self.image_tokens == "cls":
            state = state[:, :1]
        elif self.image_tokens == "patches":
            state = state[:, 1:]
        return self.adapter(state)


class IdentityAdapter(nn.Module):
    """A dlib descriptor (B, 128) -> N identity tokens: Linear, GELU, Linear, LayerNorm."""

    def __init__(self, cfg: dict[str, Any], context_width: int):
        super().__init__()
        hidden = cfg["adapter"]["hidden"]
        self.num_tokens, self.width = cfg["identity_tokens"], context_width
        self.fc1 = nn.Linear(DESCRIPTOR_DIM, hidden)
        self.fc2 = nn.Linear(hidden, self.num_tokens * context_width)
        self.norm = nn.LayerNorm(context_width, eps=cfg["adapter"]["layer_norm_eps"])

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, 128) -> (B, N, width); the descriptor is scaled to norm sqrt(128) first."""
        d = descriptors.float()
        d = d * DESCRIPTOR_DIM**0.5 / (d.norm(dim=-1, keepdim=True) + 1e-6)
        x = self.fc2(F.gelu(self.fc1(d)))
        return self.norm(x.reshape(d.shape[0], self.num_tokens, self.width))


class PhotoVerseAdapters(nn.Module):
    """The trained reference encoders: pseudo-words for the text branch, tokens for the image
    branch (the encoder's, identity tokens, or both, as the run was configured)."""

    def __init__(self, cfg: dict[str, Any], vision_width: int, text_width: int, context: int):
        super().__init__()
        self.config = cfg
        self.text_adapter = TextAdapter(cfg, vision_width, text_width)
        source = cfg["image_source"]
        self.image_adapter = (
            ImageAdapter(cfg, vision_width, context) if source != "identity" else None
        )
        self.identity_adapter = IdentityAdapter(cfg, context) if source != "encoder" else None

    @classmethod
    def from_export(cls, export: Export) -> PhotoVerseAdapters:
        """Built to the export's shapes and loaded strictly from its ``photoverse.`` tensors."""
        t = export.tensors
        vision = t[f"{ADAPTER_PREFIX}text_adapter.adapters.0.blocks.0.linear.weight"].shape[1]
        if export.config["text_input"] == "cls_mean":
            vision //= 2
        text = t[f"{ADAPTER_PREFIX}text_adapter.adapters.0.proj.weight"].shape[0]
        ctx = next(v.shape[1] for k, v in t.items() if k.endswith("processor.to_k_ip.weight"))
        model = cls(export.config, vision, text, ctx)
        state = {k[len(ADAPTER_PREFIX) :]: v for k, v in t.items() if k.startswith(ADAPTER_PREFIX)}
        model.load_state_dict(state, strict=True)
        return model.eval()

    def forward(
        self,
        hidden_states: Sequence[torch.Tensor],
        num_words: int | None = None,
        descriptors: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-vision hidden states (embeddings + one per layer) -> (pseudo-words (B, m, D),
        image tokens (B, T, context))."""
        m = num_words or len(self.text_adapter.layer_ids)
        tokens = []
        if self.image_adapter is not None:
            tokens.append(self.image_adapter(hidden_states))
        if self.identity_adapter is not None:
            if descriptors is None:
                raise ValueError(
                    f"image_source={self.config['image_source']!r} reads the references' dlib "
                    "descriptors: pass descriptors (B, 128)"
                )
            tokens.append(self.identity_adapter(descriptors))
        return self.text_adapter(hidden_states, m), torch.cat(tokens, dim=1)


def preprocess_reference(images: torch.Tensor, size: int) -> torch.Tensor:
    """Reference crops (B, H, W, 3) uint8 -> CLIP pixels (B, 3, size, size): the shortest side
    to ``size`` (antialiased bicubic in float, clipped), center crop, CLIP normalisation; as
    pv_jax's ``preprocess_images``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    new_long = int(size * max(h, w) / min(h, w))
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, (nh, nw), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@contextlib.contextmanager
def inject_words(
    text_encoder: nn.Module, slots: torch.Tensor, words: torch.Tensor
) -> Iterator[None]:
    """While open, the text encoder's token embeddings at ``slots`` (B, L; k + 1 where
    pseudo-word S_(k+1) goes, 0 elsewhere) are the pseudo-words ``words`` (B, m, D)."""

    def hook(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
        idx = (slots - 1).clamp(0, words.shape[1] - 1).long()
        gathered = torch.gather(words, 1, idx[..., None].expand(-1, -1, words.shape[-1]))
        return torch.where((slots > 0)[..., None], gathered.to(out.dtype), out)

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class PhotoVerseAttnProcessor(nn.Module):
    """Cross-attention with PhotoVerse's image branch (SPEC.md): gamma Attn(Q, K_T, V_T) +
    sigma Attn(Q, K_S, V_S), then the output projection. The text keys / values carry the LoRA
    (PEFT, scaled by the UNet call's ``scale``: our alpha); ``to_k_ip`` / ``to_v_ip`` are
    W_k^S, W_v^S, named as IP-Adapter's."""

    def __init__(self, context_dim: int, inner: int, bias: bool = False):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=bias)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=bias)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        gamma: float = 1.0,
        sigma: float = 1.0,
    ) -> torch.Tensor:
        """diffusers' processor signature, with the PhotoVerse knobs as keywords."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        b, heads = hidden_states.shape[0], attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(
            q, split(attn.to_k(context)), split(attn.to_v(context))
        )
        out = gamma * out
        if image_tokens is not None:
            image_tokens = image_tokens.to(q.dtype)
            k_s, v_s = split(self.to_k_ip(image_tokens)), split(self.to_v_ip(image_tokens))
            out = out + sigma * F.scaled_dot_product_attention(q, k_s, v_s)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class _IgnoresKnobs:
    """A self-attention layer's processor that takes (and ignores) the PhotoVerse knobs, so
    that diffusers does not log them as unexpected on every call."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        gamma: float = 1.0,
        sigma: float = 1.0,
    ) -> torch.Tensor:
        """The wrapped processor, without the knobs."""
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install(unet: nn.Module, export: Export, adapter_name: str = "photoverse") -> None:
    """Load the export's LoRA into ``unet`` through PEFT and give every cross-attention layer
    a :class:`PhotoVerseAttnProcessor` with its W_k^S, W_v^S (strictly: every layer, every
    tensor, in shape)."""
    lora = {k: v for k, v in export.tensors.items() if ".lora_" in k}
    if lora:
        unet.load_lora_adapter(lora, prefix="unet", adapter_name=adapter_name)
    processors = {}
    for name in unet.attn_processors:
        key = f"unet.{name}"
        if f"{key}.to_k_ip.weight" not in export.tensors:
            processors[name] = _IgnoresKnobs(unet.attn_processors[name])  # self-attention
            continue
        k_ip = export.tensors[f"{key}.to_k_ip.weight"]
        proc = PhotoVerseAttnProcessor(
            k_ip.shape[1], k_ip.shape[0], f"{key}.to_k_ip.bias" in export.tensors
        )
        state = {
            k[len(key) + 1 :]: v for k, v in export.tensors.items() if k.startswith(f"{key}.to_")
        }
        proc.load_state_dict(state, strict=True)
        processors[name] = proc
    missing = [
        k for k in export.tensors if k.endswith("to_k_ip.weight") and k[5:-15] not in processors
    ]
    if missing:
        raise ValueError(f"the export's image branch has layers this UNet lacks: {missing[:3]}")
    unet.set_attn_processor(processors)


def knobs(
    image_tokens: torch.Tensor | None, gamma: float, sigma: float, alpha: float
) -> dict[str, Any]:
    """The UNet's ``cross_attention_kwargs`` for one PhotoVerse call (alpha is PEFT's scale)."""
    return {"image_tokens": image_tokens, "gamma": gamma, "sigma": sigma, "scale": alpha}
