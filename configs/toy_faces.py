# python train_tpu.py --config configs/toy_faces.py:full --workdir toy_work/pv_full
"""PhotoVerse at toy scale on real faces (``python -m pv_jax.toy`` builds what it reads): the
toy base model (``models/toy_faces/sd``), the self-supervised image encoder
(``models/toy_faces/clip_vision``) and the training people's faces (``toy_work/faces_train``),
64 px. The method is the paper's: frozen base, L_diff + 0.01 L_face + 0.01 L_Treg + 0.001 L_Sreg,
random fusion, the face loss through the JAX dlib net.

``get_config(arg)``: ``full`` (default), ``no_face`` (face_weight 0) or ``no_image`` (no image
branch: sigma 0, no random fusion, no L_Sreg): the paper's two main ablations; ``ladder``: the
recipe that rung 0 of docs/EXPERIMENTS.md found to use its reference (the image branch
zero-initialised, no random fusion: gamma = sigma = 1 in every step, no face loss, AdamW 1e-3),
trained on every training photo for rung 2:

    python train_tpu.py --config configs/toy_faces.py:ladder --workdir toy_work/ladder

``ladder_identity``: the ladder with identity tokens beside the encoder's (rung 4: the image
branch also reads 4 tokens made from the reference's dlib descriptor).
"""

import ml_collections

from pv_jax.photoverse import AdapterConfig, PhotoVerseConfig
from pv_jax.train.config import default_config

VARIANTS = ("full", "no_face", "no_image", "ladder", "ladder_identity", "ladder_identity_aug")
WORK = "toy_work"
MODELS = "models/toy_faces"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The toy PhotoVerse run; ``arg`` is one of VARIANTS."""
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"configs/toy_faces.py:{variant}: choose one of {list(VARIANTS)}")
    model = PhotoVerseConfig(
        text_layers=(6, 1, 2, 3, 4),  # the toy vision tower has 6 layers: deepest, then spaced
        adapter=AdapterConfig(hidden=256),
        lora_rank=4,
        # The committed toy runs decode every sample whole (i.i.d. t): at 64 px the face branch
        # is cheap, and the window's gradient is far from the whole decode's there
        # (docs/BENCHMARKS.md, bench/face_window.py).
        face_batch_fraction=1.0,
        face_window=1.0,
    )
    c = default_config()
    c.model = model.to_dict()
    if variant == "no_face":
        c.model.face_weight = 0.0
    if variant == "no_image":
        c.model.sigma = 0.0
        c.model.image_reg_weight = 0.0
        c.train.fusion = False
    if variant.startswith("ladder"):
        c.model.face_weight = 0.0
        c.model.image_branch_init = "zero"
        c.train.fusion = False
    if variant.startswith("ladder_identity"):
        c.model.image_source = "both"
        c.model.identity_tokens = 4
    if variant == "ladder_identity_aug":
        c.data.reference_augment = 1.0
        c.data.descriptor_noise = 0.025  # a descriptor moves about 0.28; people are > 0.45 apart
    c.base.kind = "folders"
    c.base.sd_folder = f"{MODELS}/sd"
    c.base.clip_vision_folder = f"{MODELS}/clip_vision"
    c.data.source = "records"
    c.data.data_dir = f"{WORK}/faces_train"
    c.data.resolution = 64
    c.data.prompts = ("a photo of S*",)
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 50
    c.train.batch_size = 8
    c.train.steps = 400  # about 9 minutes a run on 2 CPU cores (25.8 GFLOP a step)
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2
    c.train.sample_every = 200
    c.train.sample_steps = 25
    c.train.tensorboard = False
    if variant.startswith("ladder"):  # the gap's curve against steps, on the validation people
        c.optim.lr = 1e-3
        c.train.steps = 5000
        c.train.checkpoint_every = 500
        c.train.keep_checkpoints = 20
        c.train.sample_every = 0
    return c
