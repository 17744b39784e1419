"""Shared helpers for the parity tests: tiny PyTorch reference models and layout conversions."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

# Tests run on the CPU with float32 matmuls at full precision (parity is measured in fp32).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per test session, shared through the environment with the
# processes the tests start (pytest-xdist workers, train_tpu.py runs, the multi-device checks): a
# program that several tests or processes compile alike (the tiny train step, the sampler) is
# compiled once and then loaded. Every session starts empty, so each program is still compiled at
# least once; PV_JAX_TEST_CACHE=DIR keeps a cache across sessions (local reruns).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # else a parent session's (xdist) or the user's
    if "PV_JAX_TEST_CACHE" in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["PV_JAX_TEST_CACHE"]
    else:
        _OWN_CACHE = tempfile.mkdtemp(prefix="pv_jax_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The tests compile hundreds of small programs and run each briefly: LLVM's optimisation of the
# generated CPU code is most of a compile here and buys nothing, so they compile at backend
# optimisation level 0 (make test: 17 min 49 s -> 13 min 14 s on a 2-core AVX2 machine). XLA's
# HLO passes (fusion, layout, the algorithms) are unchanged; results can differ in the last bits
# (no FMA contraction), inside every tolerance. An XLA_FLAGS that sets the level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(2)

from pv_jax.models.presets import TINY_TEXT, TINY_UNET, TINY_VISION  # noqa: E402
from pv_jax.models.presets import TINY_VAE as PRESET_VAE  # noqa: E402

# Eager NNX calls dispatch op by op; jit keeps the tiny tests fast.
apply = jax.jit(lambda m, *a, **kw: m(*a, **kw))


def _diffusers_kwargs(config, **changes) -> dict:
    """A preset as diffusers constructor kwargs, with ``changes``."""
    d = dataclasses.replace(config, **changes).to_diffusers()
    d.pop("_class_name")
    return d


# The parity tests' configs: the presets of pv_jax.models.presets (which keep every structural
# feature of the SD networks), varied where a test needs a case the preset does not cover.
# Cross-attention widths unlike the UNet's own catch transposed context projections; SD 1.5's two
# layers per block (the tiny preset has one: a quarter less to compile in every PhotoVerse test).
TINY_UNET_SD1 = _diffusers_kwargs(
    TINY_UNET, layers_per_block=2, attention_head_dim=2, cross_attention_dim=24
)
# SD 2.x style: per-block heads, linear projections, upcast attention, other time embedding.
TINY_UNET_SD2 = _diffusers_kwargs(
    TINY_UNET,
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
TINY_VAE = _diffusers_kwargs(PRESET_VAE)
# Kwargs for both our CLIP configs and transformers': the presets' sizes (tests set the
# activation, projection and EOS id they vary); a 2-layer vision tower, and a text tower with a
# small vocabulary and 16 positions (the packaged tokenizer is not used with it).
_CLIP_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TINY_CLIP_VISION = {
    k: getattr(TINY_VISION, k) for k in (*_CLIP_SIZES, "image_size", "patch_size", "projection_dim")
} | {"num_hidden_layers": 2}
TINY_CLIP_TEXT = {k: getattr(TINY_TEXT, k) for k in (*_CLIP_SIZES, "pad_token_id")} | {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 16,
    "bos_token_id": 0,
}


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


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory):
    """The committed toy run (models/toy_faces/photoverse) loaded, and its export written once:
    (bundle, path)."""
    from pv_jax.export import write_export
    from pv_jax.run_checkpoint import load_trained

    path = tmp_path_factory.mktemp("toy_export") / "toy.safetensors"
    bundle = load_trained(Path(__file__).resolve().parent.parent / "models/toy_faces/photoverse")
    write_export(bundle, path)
    return bundle, path


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
        **tokens.arrays(),  # input_ids, slots (and SDXL's input_ids_2)
    )


_LOSS_PROGRAMS: dict = {}


def tiny_loss_and_grads(bundle):
    """The tiny PhotoVerse's loss with the gradients of the total and of the face term alone:
    one jitted program of (trainable, frozen, batch, key) -> (total, metrics, grads, face grads),
    shared by the tests that need them, so that it compiles once (in this process, or through the
    persistent cache in the other worker). Random fusion off (gamma = sigma = 1) and the whole
    image decoded for the face loss (``face_window`` 1: the window has its own test); the batch
    carries the target's ``descriptor``, as the training data do."""
    if id(bundle) not in _LOSS_PROGRAMS:
        from flax import nnx

        from pv_jax.photoverse import photoverse_loss, split_trainable

        config = dataclasses.replace(bundle.config, face_window=1.0)
        graphdef = split_trainable(bundle.model)[0]

        def loss_and_grads(trainable, frozen, batch, key):
            def terms(tr):
                model = nnx.merge(graphdef, tr, frozen)
                total, metrics = photoverse_loss(
                    model, batch, key, schedule=bundle.schedule, fusion=False, config=config
                )
                return (total, metrics["face"]), metrics

            (total, _), pullback, metrics = jax.vjp(terms, trainable, has_aux=True)
            one, zero = jax.numpy.ones_like(total), jax.numpy.zeros_like(total)
            return total, metrics, pullback((one, zero))[0], pullback((zero, one))[0]

        _LOSS_PROGRAMS[id(bundle)] = (bundle, config, jax.jit(loss_and_grads))
    return _LOSS_PROGRAMS[id(bundle)][1:]


def tiny_sdxl_folders(out: Path, seed: int = 0):
    """Tiny random SDXL networks (two text towers, the zero-uncond setting, a bare DDIM
    scheduler config) written as a diffusers SDXL folder, and a random CLIP vision folder:
    (the StableDiffusion written, its folder, the vision folder)."""
    from pv_jax.models.clip import CLIPTextModel, CLIPVisionModel
    from pv_jax.models.presets import (
        TINY_SDXL_UNET,
        TINY_SDXL_VAE,
        TINY_TEXT_2,
        random_module,
    )
    from pv_jax.models.unet import UNet2DConditionModel
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.weights.hf_folders import (
        StableDiffusion,
        load_tokenizer,
        load_tokenizer_2,
        save_clip_vision,
        save_stable_diffusion,
    )

    rng = np.random.default_rng(seed)
    sd = StableDiffusion(
        unet=random_module(lambda r: UNet2DConditionModel(TINY_SDXL_UNET, rngs=r), rng),
        vae=random_module(lambda r: AutoencoderKL(TINY_SDXL_VAE, rngs=r), rng),
        text_encoder=random_module(lambda r: CLIPTextModel(TINY_TEXT, rngs=r), rng),
        tokenizer=load_tokenizer(),
        scheduler_config={"_class_name": "DDIMScheduler"},
        text_encoder_2=random_module(
            lambda r: CLIPTextModel(TINY_TEXT_2, with_projection=True, rngs=r), rng
        ),
        tokenizer_2=load_tokenizer_2(),
        force_zeros_for_empty_prompt=True,
    )
    vision = random_module(lambda r: CLIPVisionModel(TINY_VISION, rngs=r), rng)
    return (
        sd,
        save_stable_diffusion(sd, out / "sdxl"),
        save_clip_vision(vision, out / "vision"),
    )


def tiny_stable_diffusion(seed: int = 0):
    """Tiny random SD networks (UNet, VAE, CLIP text) with the packaged CLIP tokenizer."""
    from pv_jax.diffusion import NoiseSchedule
    from pv_jax.models.clip import CLIPTextModel
    from pv_jax.models.presets import TINY_TEXT, TINY_UNET, TINY_VAE, random_module
    from pv_jax.models.unet import UNet2DConditionModel
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.weights.hf_folders import StableDiffusion, load_tokenizer

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


# jax's compile events in this process, cumulative: name -> (seconds, count). One listener
# serves both readers below:
# - lowerings(): every new jit program is lowered, whether or not its executable then comes from
#   the persistent cache. A bad-input test asserts that the count does not move while the input
#   is checked: nothing was built before the error, which a wall-clock bound cannot show on a
#   loaded machine.
# - PV_JAX_TEST_PROFILE=FILE: one JSON line per test (wall seconds, and the seconds and counts of
#   the events within it: tracing, lowering, XLA's backend compile, cache hits) appended to FILE,
#   from every worker; bench/test_profile.py sums them and compares two runs (docs/testing.md).
_EVENTS: dict[str, tuple[float, int]] = {}
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_PROFILE = os.environ.get("PV_JAX_TEST_PROFILE")


def _on_event(name: str, secs: float, **_) -> None:
    seconds, count = _EVENTS.get(name, (0.0, 0))
    _EVENTS[name] = (seconds + secs, count + 1)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def lowerings() -> int:
    """How many programs jax has lowered in this process so far."""
    return _EVENTS.get(_LOWER_EVENT, (0.0, 0))[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With PV_JAX_TEST_PROFILE: time each test (setup, call, teardown) and its compile events."""
    if not _PROFILE:
        yield
        return
    import json
    import time

    before = dict(_EVENTS)
    start = time.perf_counter()
    yield
    wall = time.perf_counter() - start
    events = {}
    for name, (seconds, count) in _EVENTS.items():
        seconds_before, count_before = before.get(name, (0.0, 0))
        if count > count_before:
            events[name] = (seconds - seconds_before, count - count_before)
    row = {"test": item.nodeid, "wall": wall, "events": events}
    with open(_PROFILE, "a") as f:  # one short line per write: workers may append at once
        f.write(json.dumps(row) + "\n")


def pytest_sessionfinish(session, exitstatus):
    """Remove the compilation cache this session made (not a kept or inherited one)."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Modules whose tests share a costly module fixture: under pytest-xdist (make test: --dist load)
# each stays on one worker, so the fixture is built once; every other test is scheduled on its
# own. (xdist's xdist_group marker does not take effect with pytest 9.2: the nodeid suffix that
# its loadgroup scheduling relies on is not applied.)
# test_export and test_torch_port share the toy run's export (a session fixture): one group.
SHARED_FIXTURE_GROUPS = {
    "tests/test_toy.py": "toy",
    "tests/test_app.py": "app",
    "tests/test_export.py": "toy_export",
    "tests/test_torch_port.py": "toy_export",
    "tests/test_torch_sdxl.py": "torch_sdxl",
}


# The slowest tests (tens of seconds each, measured) and the shared-fixture groups (one worker
# runs each whole: a minute or more) go first, so that the last tests a worker takes are short
# ones and the two workers finish together.
SLOW_FIRST = (
    "tests/test_toy.py",
    "tests/test_torch_sdxl.py",
    "tests/test_app.py",
    "tests/test_export.py",
    "tests/test_torch_port.py",
    "tests/test_train.py::test_nan_batch_is_skipped_then_training_goes_on",
    "tests/test_sdxl_photoverse.py::test_loss_and_gradients_on_sdxl",
    "tests/test_photoverse_model.py::test_trainable_partition_and_gradients",
    "tests/test_losses.py::test_loss_terms_match_direct_computation",
    "tests/test_losses.py::test_window_and_sub_batch_equal_the_full_decode_for_a_local_decoder",
    "tests/test_sdxl_photoverse.py::test_sampler_sdxl_one_compile_and_zero_uncond",
    "tests/test_diagnose.py::test_branch_outputs_per_layer",
    "tests/test_photoverse_model.py::test_unet_equals_plain_unet_without_image_branch",
)


def pytest_collection_modifyitems(session, config, items):
    """Run SLOW_FIRST's tests (and their parametrisations) before the rest, in its order."""

    def rank(item) -> int:
        return next(
            (i for i, name in enumerate(SLOW_FIRST) if item.nodeid.startswith(name)),
            len(SLOW_FIRST),
        )

    items.sort(key=rank)  # stable: every other test keeps its collection order


def pytest_xdist_make_scheduler(config, log):
    """``--dist load``, except that the tests of each SHARED_FIXTURE_GROUPS group stay together."""
    if config.getvalue("dist") != "load":
        return None  # another --dist asked for: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_FIXTURE_GROUPS.get(nodeid.split("::", 1)[0], nodeid)

    return Scheduler(config, log)
