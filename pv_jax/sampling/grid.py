"""The sample grid that training writes every ``train.sample_every`` steps: a row of
(reference, sample) pairs drawn with the current weights, for watching a run."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from pv_jax.photoverse import PhotoVerseBundle
from pv_jax.sampling.sampler import Sampler, SamplerSpec, empty_prompt_ids


class SampleGrid:
    """(reference, sample) pairs with the current weights: the first ``count`` ``references``,
    one ``prompt``, a fixed seed; ``descriptors`` (the batch's dlib descriptors) feed a model
    whose image branch reads identity tokens."""

    def __init__(
        self,
        bundle: PhotoVerseBundle,
        graphdef: nnx.GraphDef,
        frozen: nnx.State,
        references: np.ndarray,
        prompt: str,
        *,
        steps: int,
        resolution: int,
        count: int = 4,
        descriptors: np.ndarray | None = None,
    ):
        self.graphdef, self.frozen = graphdef, frozen
        if bundle.config.uses_identity and descriptors is None:
            raise ValueError(
                f"image_source={bundle.config.image_source!r}: the sample grid needs the "
                "references' dlib descriptors (a training batch's 'descriptor')"
            )
        # Process 0's references on every process: the sampler's inputs must agree.
        self.refs = multihost_utils.broadcast_one_to_all(references[:count])
        self.descriptors = (
            multihost_utils.broadcast_one_to_all(descriptors[:count])
            if bundle.config.uses_identity
            else [None] * len(self.refs)
        )
        self.tokens = bundle.tokenizer([prompt], bundle.config.words)
        self.empty = empty_prompt_ids(bundle.tokenizer)
        self.sampler = Sampler(bundle.model, bundle.schedule)
        self.spec = SamplerSpec(steps=steps)
        unet, vae = bundle.model.unet.config, bundle.model.vae.config
        latent = resolution // vae.downsample_factor
        self.noise = jax.random.normal(jax.random.key(0), (1, latent, latent, unet.in_channels))
        self.size = resolution

    def __call__(self, trainable: Any) -> np.ndarray:
        """(size, 2 * count * size, 3) uint8: reference, sample, reference, sample, ..."""
        _, state = nnx.split(nnx.merge(self.graphdef, trainable, self.frozen))
        tiles = []
        for ref, descriptor in zip(self.refs, self.descriptors, strict=True):
            image = self.sampler(
                np.asarray(ref)[None],
                self.tokens.input_ids,
                self.tokens.slots,
                noise=self.noise,
                key=jax.random.key(1),
                input_ids_2=self.tokens.input_ids_2,
                **self.empty,
                num_words=self.tokens.num_words,
                spec=self.spec,
                state=state,
                descriptors=None if descriptor is None else np.asarray(descriptor)[None],
            )
            ref = np.asarray(ref, np.uint8)
            ref_tile = np.asarray(Image.fromarray(ref).resize((self.size, self.size)))
            tiles += [ref_tile, (np.asarray(image[0]) * 255).round().astype(np.uint8)]
        return np.concatenate(tiles, axis=1)
