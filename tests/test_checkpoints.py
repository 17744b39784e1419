"""diffusers / transformers folders: load, variants, errors, and export round trips."""

from __future__ import annotations

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    TINY_CLIP_TEXT,
    TINY_CLIP_VISION,
    TINY_UNET_SD1,
    TINY_VAE,
    apply,
    perturb_,
    to_nchw,
    to_nhwc,
)
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers import CLIPTextModel as TorchCLIPText

from pv_jax.weights.convert import WeightImportError
from pv_jax.weights.hf_folders import (
    CheckpointFolderError,
    load_clip_text,
    load_clip_vision,
    load_stable_diffusion,
    load_tokenizer,
    load_unet,
    save_clip_vision,
    save_stable_diffusion,
)

TOL = 1e-4  # fp32 parity, as in the per-network tests

# The real CLIP vocabulary and SD's 77 positions, so the packaged tokenizer fits.
TEXT = dict(TINY_CLIP_TEXT, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random Stable Diffusion folder written by diffusers, and its torch pipeline."""
    torch.manual_seed(0)
    unet = perturb_(TorchUNet(**dict(TINY_UNET_SD1, cross_attention_dim=32)))
    vae = perturb_(TorchVAE(**TINY_VAE), seed=1)
    text = perturb_(TorchCLIPText(CLIPTextConfig(**TEXT)), seed=2)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=load_tokenizer(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd")
    pipe.save_pretrained(folder)
    return folder, pipe


def _unet_io():
    r = np.random.RandomState(3)
    x = r.randn(2, 4, 16, 16).astype(np.float32)
    ctx = r.randn(2, 77, 32).astype(np.float32)
    return x, np.array([3, 700]), ctx


def _torch_unet(unet, x, t, ctx):
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


def test_parity_sd_folder(sd_folder):
    folder, pipe = sd_folder
    sd = load_stable_diffusion(folder)
    x, t, ctx = _unet_io()
    got = apply(sd.unet, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx))
    np.testing.assert_allclose(to_nchw(got), _torch_unet(pipe.unet, x, t, ctx), atol=TOL)

    ids = sd.tokenizer(["a photo of a cat"], padding="max_length", max_length=77).input_ids
    ids = np.asarray(ids)
    with torch.no_grad():
        want = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
    out = jax.jit(lambda m, i: m(i).last_hidden_state)(sd.text_encoder, ids)
    np.testing.assert_allclose(np.asarray(out), want, atol=TOL)

    z = np.random.RandomState(4).randn(1, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    img = jax.jit(lambda m, z: m.decode(z))(sd.vae, jnp.asarray(to_nhwc(z)))
    np.testing.assert_allclose(to_nchw(img), want, atol=TOL)
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"


def test_fp16_variant_bin_and_sharded_weights(sd_folder, tmp_path):
    _, pipe = sd_folder
    x, t, ctx = _unet_io()
    want = _torch_unet(pipe.unet, x, t, ctx)
    # fp16 variant only (as many SD folders ship): loaded and upcast to fp32 parameters.
    pipe.unet.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert list((tmp_path / "fp16").glob("*.fp16.safetensors"))
    unet16 = load_unet(tmp_path / "fp16")
    assert unet16.conv_in.kernel.get_value().dtype == jnp.float32
    got = to_nchw(apply(unet16, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx)))
    assert np.abs(got - want).max() < 2e-2  # fp16 rounding of the weights only
    # PyTorch pickle, read with weights_only=True.
    pipe.unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    got = apply(load_unet(tmp_path / "bin"), jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx))
    np.testing.assert_allclose(to_nchw(got), want, atol=TOL)
    # Sharded safetensors with an index.
    pipe.unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    got = apply(load_unet(tmp_path / "sharded"), jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx))
    np.testing.assert_allclose(to_nchw(got), want, atol=TOL)


def test_clip_keys_with_and_without_prefix(sd_folder, tmp_path):
    folder, _ = sd_folder
    src = folder / "text_encoder"
    tensors = load_file(str(src / "model.safetensors"))
    has_prefix = any(k.startswith("text_model.") for k in tensors)
    flipped = {
        (k.removeprefix("text_model.") if has_prefix else "text_model." + k): v
        for k, v in tensors.items()
    }
    shutil.copytree(src, tmp_path / "te")
    save_file(flipped, str(tmp_path / "te" / "model.safetensors"))
    ids = np.arange(77)[None] % 1000
    a = jax.jit(lambda m, i: m(i).last_hidden_state)(load_clip_text(src), ids)
    b = jax.jit(lambda m, i: m(i).last_hidden_state)(load_clip_text(tmp_path / "te"), ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_round_trip_diffusers_loads_it(sd_folder, tmp_path):
    folder, pipe = sd_folder
    sd = load_stable_diffusion(folder)
    out = save_stable_diffusion(sd, tmp_path / "export")
    back = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    x, t, ctx = _unet_io()
    np.testing.assert_allclose(
        _torch_unet(back.unet, x, t, ctx), _torch_unet(pipe.unet, x, t, ctx), atol=1e-6
    )
    z = torch.from_numpy(np.random.RandomState(5).randn(1, 4, 8, 8).astype(np.float32))
    ids = torch.arange(77)[None] % 1000
    with torch.no_grad():
        np.testing.assert_allclose(
            back.vae.decode(z).sample.numpy(), pipe.vae.decode(z).sample.numpy(), atol=1e-6
        )
        np.testing.assert_allclose(
            back.text_encoder(ids).last_hidden_state.numpy(),
            pipe.text_encoder(ids).last_hidden_state.numpy(),
            atol=1e-6,
        )


def test_clip_vision_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(**TINY_CLIP_VISION)
    ref = perturb_(CLIPVisionModelWithProjection(cfg))
    ref.save_pretrained(tmp_path / "in")
    ours = load_clip_vision(tmp_path / "in")
    save_clip_vision(ours, tmp_path / "out")
    back = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out").eval()
    px = torch.from_numpy(np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32))
    with torch.no_grad():
        a, b = ref(px).image_embeds.numpy(), back(px).image_embeds.numpy()
    np.testing.assert_allclose(b, a, atol=1e-6)
    got = jax.jit(lambda m, p: m(p).image_embeds)(ours, jnp.asarray(to_nhwc(px.numpy())))
    np.testing.assert_allclose(np.asarray(got), a, atol=TOL)


def test_bad_folders_say_what_was_expected(sd_folder, tmp_path):
    folder, _ = sd_folder
    with pytest.raises(CheckpointFolderError, match=r"missing subfolders \['unet'"):
        load_stable_diffusion(tmp_path)
    (tmp_path / "u").mkdir()
    with pytest.raises(CheckpointFolderError, match="no config.json"):
        load_unet(tmp_path / "u")
    shutil.copy(folder / "unet" / "config.json", tmp_path / "u" / "config.json")
    with pytest.raises(CheckpointFolderError, match="no weights in"):
        load_unet(tmp_path / "u")
    # Weights from a different architecture: every offending key is listed.
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["layers_per_block"] = 1
    shutil.copytree(folder / "unet", tmp_path / "u1")
    (tmp_path / "u1" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightImportError, match=r"unexpected keys \(\d+\)") as e:
        load_unet(tmp_path / "u1")
    assert "down_blocks.0.resnets.1.conv1.weight" in str(e.value)


def test_safetensors_reader_dtypes_and_truncation(tmp_path):
    from safetensors.torch import save_file as torch_save_file

    from pv_jax.weights.tensor_files import open_tensors

    want = {
        "bf16": torch.randn(3, 4, dtype=torch.bfloat16),
        "f16": torch.randn(5, dtype=torch.float16),
        "f32": torch.randn(2, 2),
        "i64": torch.arange(4),
    }
    path = tmp_path / "t.safetensors"
    torch_save_file(want, str(path))
    with open_tensors([path]) as src:
        assert sorted(src) == sorted(want)
        for k, v in want.items():
            got = src[k]()
            assert got.shape == tuple(v.shape)
            np.testing.assert_array_equal(got.astype(np.float64), v.double().numpy())
    path.write_bytes(path.read_bytes()[:-10])
    with open_tensors([path]) as src, pytest.raises(CheckpointFolderError, match="truncated"):
        for read in src.values():  # the last tensor in the file lost its tail
            read()
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    with (
        pytest.raises(CheckpointFolderError, match="not a valid safetensors"),
        open_tensors([tmp_path / "junk.safetensors"]),
    ):
        pass


def test_safetensors_writer_streams_and_reads_back(tmp_path):
    import gc
    import weakref

    import ml_dtypes
    from safetensors.torch import load_file as torch_load_file

    from pv_jax.weights.convert import LazyTensor
    from pv_jax.weights.tensor_files import write_safetensors

    rng = np.random.RandomState(0)
    eager = {
        "f16": rng.randn(5).astype(np.float16),
        "bf16": rng.randn(3, 4).astype(ml_dtypes.bfloat16),
        "i64": np.arange(7),
        "bool": np.array([True, False, True]),
        "scalar": np.float32(2.5).reshape(()),
        "empty": np.zeros((0, 3), np.float32),
    }
    alive: list[weakref.ref] = []

    def lazy(array: np.ndarray) -> LazyTensor:
        def make() -> np.ndarray:
            gc.collect()
            # Streaming: every tensor made before this one has been written and let go.
            chex.assert_trees_all_equal([r() for r in alive], [None] * len(alive))
            out = array.copy()
            alive.append(weakref.ref(out))
            return out

        return LazyTensor(array.shape, make)

    big = {f"lazy.{i}": rng.randn(16, 3 + i).astype(np.float32) for i in range(4)}
    path = write_safetensors(
        tmp_path / "w.safetensors",
        {**eager, **{k: lazy(v) for k, v in big.items()}},
        {"format": "pt"},
    )
    assert len(alive) == 4
    want = {**eager, **big}
    got = load_file(str(path))  # safetensors' own reader, and torch's
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        chex.assert_shape(got[k], v.shape)
        np.testing.assert_array_equal(got[k], v)
    back = torch_load_file(str(path))
    np.testing.assert_array_equal(back["bf16"].float().numpy(), eager["bf16"].astype(np.float32))
    (n,) = np.frombuffer(path.read_bytes()[:8], "<u8")
    assert n % 8 == 0
    # Larger elements first, so each tensor's data is aligned to its element size (f16's 5
    # elements would otherwise misalign the f32 tensors after it).
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    for k, info in header.items():
        assert info["data_offsets"][0] % want[k].dtype.itemsize == 0, k

    # A tensor made with another shape than announced: an error naming it, the earlier file
    # intact and no partial file left.
    before = path.read_bytes()
    bad = LazyTensor((4,), lambda: np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"tensor bad was made as \(5,\)"):
        write_safetensors(path, {"ok": np.zeros(2, np.float32), "bad": bad})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    with pytest.raises(ValueError, match="header key, not a tensor name"):
        write_safetensors(tmp_path / "m.safetensors", {"__metadata__": np.zeros(1)})
    with pytest.raises(ValueError, match="metadata maps str to str"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(1)}, {"format": 1})
    with pytest.raises(ValueError, match="complex128, which safetensors lacks"):
        write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros(2, np.complex128)})


def test_sharded_writes_stream_into_from_pretrained_shards(tmp_path):
    """Past the shard size: numbered shards and the .index.json that from_pretrained (and our
    reader) follow, each tensor made only when its shard is written; under it, one file."""
    from safetensors.numpy import load_file

    from pv_jax.weights.convert import LazyTensor
    from pv_jax.weights.hf_folders import find_weights
    from pv_jax.weights.tensor_files import open_tensors, write_sharded_safetensors

    rng = np.random.RandomState(0)
    want = {f"w.{i}": rng.randn(10, 10).astype(np.float32) for i in range(5)}  # 400 B each
    made = []
    lazy = {
        k: LazyTensor(v.shape, lambda k=k, v=v: made.append(k) or v.copy()) for k, v in want.items()
    }
    paths = write_sharded_safetensors(tmp_path / "a", "model", lazy, {"format": "pt"}, 1000)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(made) == sorted(want)  # each made once
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    assert sorted(index["weight_map"]) == sorted(want)
    assert sorted(set(index["weight_map"].values())) == [p.name for p in paths]
    files = find_weights(tmp_path / "a", ("model",))
    assert files == paths
    with open_tensors(files) as src:
        for k, v in want.items():
            np.testing.assert_array_equal(src[k](), v)
    for p in paths:  # every shard is a plain safetensors file
        assert set(load_file(str(p))) == {k for k, f in index["weight_map"].items() if f == p.name}
    one = write_sharded_safetensors(tmp_path / "b", "model", want, None, 10_000)
    assert [p.name for p in one] == ["model.safetensors"]
    assert not (tmp_path / "b" / "model.safetensors.index.json").exists()


def test_packaged_tokenizer_is_openai_clip():
    tok = load_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    # OpenAI CLIP's ids (as in every SD 1.x tokenizer/): BOS, a, photo, of, a, cat, EOS.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.decode(tok("an astronaut riding a horse").input_ids[1:-1]) == (
        "an astronaut riding a horse"
    )
