# python train_tpu.py --config configs/photoverse_sd15.py --workdir gs://BUCKET/pv_sd15 \
#   --config.base.sd_folder=/data/stable-diffusion-v1-5 \
#   --config.base.clip_vision_folder=/data/clip-vit-large-patch14 \
#   --config.data.data_dir=/data/pv_faces --distributed
"""PhotoVerse on Stable Diffusion 1.5 with the paper's settings: AdamW, lr 1e-4, batch 64,
60k steps, 512 px, m = 5 pseudo-words, loss weights 0.01 / 0.01 / 0.001 (SPEC.md defaults).
bf16 compute with fp32 master weights, remat and FSDP are our choices. The mesh is
(data = devices / fsdp, fsdp): ``fsdp=N`` shards weights and optimizer state over N devices
(default 1: pure data parallelism, every device holds all of SD1.5's 1.4B weights).

The argument after the colon combines (``configs/photoverse_sd15.py:fsdp=2,image_source=both``):
``fsdp=N``; ``grad_accum=K``: the batch of 64 as K microbatches inside each step, the same
update with 1/K the activations (a slice of fewer chips than the batch needs);
``image_source=identity|both`` [ours] feeds the image branch ``identity_tokens=N`` (default 4)
tokens made from the reference's dlib descriptor, instead of or beside the image encoder's
(CC0 face-ID conditioning; docs/EXPERIMENTS.md, rung 4)."""

import ml_collections

from configs.common import parse_arg
from pv_jax.train.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's training run; ``arg``: ``fsdp=N``, ``image_source=...``,
    ``identity_tokens=N``, ``grad_accum=K``, comma-separated."""
    a = parse_arg(arg, fsdp=1, grad_accum=1, image_source="encoder", identity_tokens=4)
    c = default_config()  # the paper's batch 64, 60k steps, lr 1e-4, 512 px
    c.model.image_source = a.image_source
    c.model.identity_tokens = a.identity_tokens
    c.base.dtype = "bfloat16"
    c.base.remat = True
    c.train.sample_every = 2000
    c.mesh.fsdp = a.fsdp
    c.train.grad_accum = a.grad_accum
    return c
