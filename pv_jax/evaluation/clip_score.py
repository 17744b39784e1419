"""CLIP-T: how well an image follows its prompt, as the cosine between CLIP's image and text
embeddings (a transformers ``CLIPModel`` folder, e.g. openai/clip-vit-large-patch14)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.models.clip import CLIPTextModel, CLIPVisionModel, preprocess_images
from pv_jax.weights.hf_folders import load_clip, load_tokenizer


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
    """Cosine similarity between CLIP image and text embeddings, jitted per batch shape."""

    def __init__(self, text: CLIPTextModel, vision: CLIPVisionModel, tokenizer):
        if text.text_projection is None or vision.visual_projection is None:
            raise ValueError("CLIP-T needs both projections: load a full CLIPModel folder")
        self.tokenizer = tokenizer
        self.max_length = text.config.max_position_embeddings
        self.image_size = vision.config.image_size
        size = self.image_size
        text_def, self._text_state = nnx.split(text)
        vision_def, self._vision_state = nnx.split(vision)
        self._text = jax.jit(lambda st, ids: _unit(nnx.merge(text_def, st)(ids).text_embeds))
        self._image = jax.jit(
            lambda st, x: _unit(nnx.merge(vision_def, st)(preprocess_images(x, size)).image_embeds)
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPScorer:
        """Load a CLIPModel folder; its tokenizer files if present, else the packaged CLIP BPE."""
        text, vision = load_clip(folder)
        has_tokenizer = any((Path(folder) / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        return cls(text, vision, load_tokenizer(folder if has_tokenizer else None))

    def token_ids(self, texts: list[str]) -> np.ndarray:
        """CLIP token ids (N, 77): padded and cut as CLIP's processor does."""
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length
        )["input_ids"]

    def text_embeds(self, texts: list[str]) -> np.ndarray:
        """Unit text embeddings (N, projection_dim)."""
        return np.asarray(self._text(self._text_state, jnp.asarray(self.token_ids(texts))))

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """Unit image embeddings (N, projection_dim) of RGB uint8 images (N, H, W, 3)."""
        return np.asarray(self._image(self._vision_state, jnp.asarray(images)))

    def __call__(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        """CLIP-T (N,): the cosine of image i with text i."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        return np.sum(self.image_embeds(images) * self.text_embeds(texts), axis=-1)
