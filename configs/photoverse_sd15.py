# python train_tpu.py --config configs/photoverse_sd15.py --workdir gs://BUCKET/pv_sd15 \
#   --config.base.sd_folder=/data/stable-diffusion-v1-5 \
#   --config.base.clip_vision_folder=/data/clip-vit-large-patch14 \
#   --config.data.data_dir=/data/pv_faces --distributed
"""PhotoVerse on Stable Diffusion 1.5 with the paper's settings: AdamW, lr 1e-4, batch 64,
60k steps, 512 px, m = 5 pseudo-words, loss weights 0.01 / 0.01 / 0.001 (SPEC.md defaults).
bf16 compute with fp32 master weights, remat and FSDP over all devices are our choices.
``get_config("fsdp=N")`` sets the FSDP axis size (default: 1, pure data parallelism)."""

import ml_collections

from pv_jax.train.config import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's training run; ``arg`` may be ``"fsdp=N"``."""
    c = default_config()
    c.base.kind = "folders"
    c.base.dtype = "bfloat16"
    c.base.remat = True
    c.data.source = "records"
    c.data.resolution = 512
    c.train.batch_size = 64
    c.train.steps = 60_000
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.train.sample_every = 2000
    if arg and arg.startswith("fsdp="):
        c.mesh.fsdp = int(arg.split("=", 1)[1])
    return c
