# python train_tpu.py --config configs/tiny.py --workdir /tmp/pv_tiny
"""Tiny random networks on synthetic faces: the whole training path (face loss included) in
about a minute on a laptop CPU. ``get_config("records")`` reads a built face dataset instead
(``--config.data.data_dir=DIR``)."""

import ml_collections

from pv_jax.photoverse import TINY_CONFIG
from pv_jax.train.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The tiny config; ``arg="records"`` for the face dataset instead of synthetic data."""
    c = default_config()
    c.model = TINY_CONFIG.to_dict()
    c.base.kind = "tiny"
    c.data.source = "records" if arg == "records" else "synthetic"
    c.data.resolution = 32  # tiny VAE (2x) -> 16x16 latents, the tiny UNet's sample size
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.train.batch_size = 2
    c.train.steps = 20
    c.train.log_every = 1
    c.train.checkpoint_every = 10
    c.train.sample_every = 10
    c.train.sample_steps = 5
    return c
