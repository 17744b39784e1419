"""Shared helpers for the parity tests: tiny PyTorch reference models and layout conversions."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run on the CPU with float32 matmuls at full precision (parity is measured in fp32).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)

# Eager NNX calls dispatch op by op; jit keeps the tiny tests fast.
apply = jax.jit(lambda m, *a, **kw: m(*a, **kw))

# Tiny configs that keep every structural feature of the SD networks.
TINY_UNET_SD1 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=2,
    attention_head_dim=2,
    cross_attention_dim=24,
    norm_num_groups=8,
)
# SD 2.x style: per-block heads, linear projections, upcast attention, other time embedding.
TINY_UNET_SD2 = dict(
    TINY_UNET_SD1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    cross_attention_dim=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
TINY_CLIP_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=1,
)


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every weight (diffusers zero-initialises some layers) and set eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def torch_source(module: torch.nn.Module, prefix: str = "") -> dict:
    """A lazy tensor source over a torch module's state dict."""
    return {prefix + k: (lambda v=v: v.detach().numpy()) for k, v in module.state_dict().items()}


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def to_nchw(x) -> np.ndarray:
    """NHWC (numpy or jax) -> NCHW numpy."""
    return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@pytest.fixture
def rng() -> np.random.RandomState:
    """A fixed numpy random state."""
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def tiny_pv():
    """Tiny random PhotoVerse (real tokenizer and dlib face net), shared: tests must not mutate
    it (use nnx.clone or split/merge copies)."""
    from pv_jax.photoverse import tiny_photoverse

    return tiny_photoverse(seed=0)


def face_batch(tokenizer, prompts=("a photo of S* as an astronaut", "S* in a garden"), m=5):
    """A tiny PhotoVerse batch: random reference/target images, landmarks of a centred face."""
    r = np.random.RandomState(0)
    b = len(prompts)
    tokens = tokenizer(list(prompts), m)
    # dlib's 5 points (eye corners, nose) of a face filling a 32x32 target.
    lm = np.array([[22, 11], [18, 11], [9, 11], [13, 11], [16, 20]], np.float32)
    return dict(
        reference=r.randint(0, 256, (b, 224, 224, 3)).astype(np.uint8),
        target=r.rand(b, 32, 32, 3).astype(np.float32),
        landmarks=np.stack([lm] * b),
        input_ids=tokens.input_ids,
        slots=tokens.slots,
    )


def tiny_stable_diffusion(seed: int = 0):
    """Tiny random SD networks (UNet, VAE, CLIP text) with the packaged CLIP tokenizer."""
    from pv_jax.diffusion import NoiseSchedule
    from pv_jax.models.clip import CLIPTextModel
    from pv_jax.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, random_module
    from pv_jax.models.unet import UNet2DConditionModel
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.weights.checkpoints import StableDiffusion, load_tokenizer

    rng = np.random.default_rng(seed)
    return StableDiffusion(
        unet=random_module(lambda r: UNet2DConditionModel(TINY_UNET, rngs=r), rng),
        vae=random_module(lambda r: AutoencoderKL(TINY_VAE, rngs=r), rng),
        text_encoder=random_module(lambda r: CLIPTextModel(TINY_TEXT, rngs=r), rng),
        tokenizer=load_tokenizer(),
        scheduler_config=NoiseSchedule().to_diffusers(),
    )


@pytest.fixture
def gcs_bucket(monkeypatch, tmp_path):
    """A real GCS API on a free localhost port (``tests/gcs_emulator.py``) with the bucket
    ``gs://bucket``, in memory; this process and ``env`` (for subprocesses) point gcsfs,
    google-cloud-storage and tensorstore at it. Yields that env."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "gcs_emulator.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "gcs_emulator.py"), "start"]
        + ["--host", "127.0.0.1", "--port", str(port), "--default-bucket", "bucket", "-M", "-q"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    proc.kill()
    proc.wait()
    log.close()
