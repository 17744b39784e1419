# python -m pv_jax.data --input /data/faces --output /data/pv_faces_1024 --target-size 1024
# python train_tpu.py --config configs/photoverse_sdxl.py --workdir gs://BUCKET/pv_sdxl \
#   --config.base.sd_folder=/data/stable-diffusion-xl-base-1.0 \
#   --config.base.clip_vision_folder=/data/clip-vit-h-14-vision \
#   --config.data.data_dir=/data/pv_faces_1024 --distributed
"""PhotoVerse on SDXL base 1.0 with the paper's method and optimiser settings (AdamW, lr 1e-4,
batch 64, 60k steps, m = 5 pseudo-words, loss weights 0.01 / 0.01 / 0.001) at SDXL's 1024 px.

Our choices: bf16 compute with fp32 master weights, remat, FSDP over the 4 chips of a v5p host
(``get_config("fsdp=N")`` to change it), OpenCLIP ViT-H/14 as the image encoder (IP-Adapter's
for SDXL; 32 layers, so the text branch reads hidden states 32, 5, 11, 16, 21: SD 1.5's 24, 4,
8, 12, 16 at the same relative depths) and SDXL's micro-conditioning from each face square's
size (``pv_jax.train.data.micro_conditioning_ids``). Two examples per chip at 1024 px take
about 31 GiB of a v5p chip's 95 GB (docs/BENCHMARKS.md, "Remat that holds"), and cost a quarter
less per example than one (the face sub-batch, half of a microbatch, is then not rounded up to
every sample), so the paper's batch of 64 on fewer than 32 chips runs as ``grad_accum=K``
microbatches of two examples per chip (the same update):

    slice (v5p chips)   v5p-8 (4)   v5p-16 (8)   v5p-32 (16)   v5p-64 (32)   v5p-128 (64)
    grad_accum          8           4            2             1             1 (one per chip)

Compiled (XLA's CPU estimate per chip): v5p-8 with K = 8, 30.2 GiB, 3.40 s per step at 40% MFU
(57 hours for the 60k steps); v5p-32 with K = 2, 30.9 GiB.

``grad_accum=K`` after the colon, or ``--config.train.grad_accum=K``. The dataset must be built
at 1024 px (``--target-size 1024``) so that targets are not upsampled.
``get_config("tiny")``: the same run on tiny random SDXL-shaped networks and synthetic faces.
The argument combines (``tiny,image_source=both``): ``fsdp=N``, ``grad_accum=K``, ``tiny``,
``image_source=identity|both`` [ours] with ``identity_tokens=N`` (default 4): the image branch
reads tokens made from the reference's dlib descriptor, instead of or beside the encoder's.
"""

import ml_collections

from configs.common import parse_arg
from pv_jax.photoverse import TINY_CONFIG, PhotoVerseConfig
from pv_jax.train.config import default_config

# CLIP ViT-H/14 has 33 hidden states (embeddings + 32 layers): deepest first, then 1/6..2/3 depth.
SDXL_TEXT_LAYERS = (32, 5, 11, 16, 21)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The SDXL training run; ``arg``: ``fsdp=N``, ``tiny``, ``image_source=...``,
    ``identity_tokens=N``, comma-separated."""
    a = parse_arg(
        arg, fsdp=None, grad_accum=1, tiny=False, image_source="encoder", identity_tokens=4
    )
    c = default_config()  # the paper's batch 64, 60k steps, lr 1e-4
    c.model = PhotoVerseConfig(text_layers=SDXL_TEXT_LAYERS).to_dict()
    c.base.dtype = "bfloat16"
    c.base.remat = True
    c.data.resolution = 1024
    c.train.sample_every = 2000
    c.mesh.fsdp = 4  # one v5p host: 4 chips of 95 GB
    if a.tiny:
        c.model = TINY_CONFIG.to_dict()
        c.base.kind = "tiny_sdxl"
        c.base.dtype = "float32"
        c.base.remat = False
        c.data.source = "synthetic"
        c.data.resolution = 32  # tiny VAE (2x) -> 16x16 latents
        c.mesh.fsdp = 1
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 5
        c.train.batch_size = 2
        c.train.steps = 4
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.train.sample_every = 2
        c.train.sample_steps = 3
    if a.fsdp is not None:
        c.mesh.fsdp = a.fsdp
    c.model.image_source = a.image_source
    c.model.identity_tokens = a.identity_tokens
    c.train.grad_accum = a.grad_accum
    return c
