"""SDXL pipeline folders (load, fp16 variant, export round trip, errors), the SDXL tokenizer_2,
and plain text-to-image against diffusers' ``StableDiffusionXLPipeline`` (latents, guidance)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import apply, perturb_, to_nchw, to_nhwc
from diffusers import AutoencoderKL as TorchVAE
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers import CLIPTextModel as TorchCLIPText

from pv_jax.models.presets import (
    TINY_SDXL_UNET,
    TINY_SDXL_VAE,
    TINY_TEXT,
    TINY_TEXT_2,
    TINY_UNET,
)
from pv_jax.models.sdxl import sdxl_time_ids
from pv_jax.sampling.txt2img import txt2img_latents
from pv_jax.weights.hf_folders import (
    CheckpointFolderError,
    load_clip_text,
    load_stable_diffusion,
    load_tokenizer_2,
    save_stable_diffusion,
)

TOL = 1e-4  # fp32 parity, as in the per-network tests
# fp16 weights (relative rounding 2^-11 ~ 5e-4 per weight) against the fp32 originals: the
# perturbed tiny networks' outputs move by a few 1e-3 at most; 2e-2 as in test_checkpoints.
FP16_TOL = 2e-2
PROMPT = "a photo of an astronaut riding a horse"
PX = 32  # image side: 16x16 latents through the tiny VAE (2 levels, factor 2)


def _diffusers(config) -> dict:
    d = config.to_diffusers()
    d.pop("_class_name")
    return d


def _hf_text(config) -> CLIPTextConfig:
    # The presets already have CLIP's 49408 tokens and 77 positions: the real tokenizers fit.
    assert config.vocab_size == 49408 and config.max_position_embeddings == 77
    return CLIPTextConfig(**config.to_hf())


def _packaged_vocab() -> tuple[dict, list]:
    from pathlib import Path

    import pv_jax

    folder = Path(pv_jax.__file__).parent / "assets" / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text())
    lines = (folder / "merges.txt").read_text().splitlines()
    return vocab, [tuple(x.split()) for x in lines if x and not x.startswith("#")]


def _tokenizer(**kw) -> CLIPTokenizer:
    """What an SDXL folder's tokenizer/ (kw: tokenizer_2/) holds: OpenAI CLIP's BPE."""
    vocab, merges = _packaged_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny torch networks run op by op on tensors too small to split: a second thread only
    adds synchronisation, which on a busy machine cost 10 s per pipeline call instead of 0.2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """A tiny random SDXL folder written by diffusers (fp32 weights plus an fp16 variant), and
    its torch pipeline."""
    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        unet=perturb_(TorchUNet(**_diffusers(TINY_SDXL_UNET))),
        vae=perturb_(TorchVAE(**_diffusers(TINY_SDXL_VAE)), seed=1),
        text_encoder=perturb_(TorchCLIPText(_hf_text(TINY_TEXT)), seed=2),
        text_encoder_2=perturb_(CLIPTextModelWithProjection(_hf_text(TINY_TEXT_2)), seed=3),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        # SDXL base's betas and spacing, with DDIM (SDXL ships Euler; only DDIM is ported).
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            timestep_spacing="leading",
            steps_offset=1,
            clip_sample=False,
            set_alpha_to_one=False,
        ),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    # The fp16 variant beside the fp32 weights (as on the Hub).
    half = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    half.save_pretrained(folder, variant="fp16")
    return folder, pipe


@pytest.fixture(scope="module")
def ours(xl_folder):
    return load_stable_diffusion(xl_folder[0])


def _unet_io():
    r = np.random.RandomState(3)
    x = r.randn(2, 4, 16, 16).astype(np.float32)
    ctx = r.randn(2, 77, TINY_SDXL_UNET.cross_attention_dim).astype(np.float32)
    pooled = r.randn(2, TINY_TEXT_2.projection_dim).astype(np.float32)
    ids = sdxl_time_ids([(1024, 768), (512, 512)], [(0, 0), (32, 16)], (PX, PX))
    return x, np.array([3, 700]), ctx, pooled, ids


def _torch_unet(unet, x, t, ctx, pooled, ids):
    with torch.no_grad():
        cond = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}
        args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx))
        return unet(*args, added_cond_kwargs=cond).sample.numpy()


def _our_unet(unet, x, t, ctx, pooled, ids):
    got = apply(
        unet, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx), text_embeds=pooled, time_ids=ids
    )
    return to_nchw(got)


def _ids(tokenizer, text=PROMPT):
    return np.asarray(tokenizer([text], padding="max_length", max_length=77).input_ids)


def _text_outputs(sd, ids):
    """Tower 1's penultimate states; tower 2's penultimate states and projected EOS."""

    @jax.jit
    def run(te, te2, ids, ids_2):
        a, b = te(ids), te2(ids_2)
        return a.hidden_states[-2], b.hidden_states[-2], b.text_embeds

    return [np.asarray(x) for x in run(sd.text_encoder, sd.text_encoder_2, *ids)]


def _torch_text_outputs(pipe, ids):
    with torch.no_grad():
        a = pipe.text_encoder(torch.from_numpy(ids[0]), output_hidden_states=True)
        b = pipe.text_encoder_2(torch.from_numpy(ids[1]), output_hidden_states=True)
    return [x.numpy() for x in (a.hidden_states[-2], b.hidden_states[-2], b.text_embeds)]


def _vae_decode(vae, z):
    return to_nchw(jax.jit(lambda m, z: m.decode(z))(vae, jnp.asarray(to_nhwc(z))))


def _errors(got: list, want: list) -> list[float]:
    return [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]


def test_parity_sdxl_folder(xl_folder, ours):
    _, pipe = xl_folder
    assert ours.is_xl and ours.force_zeros_for_empty_prompt
    assert ours.text_encoder_2.with_projection and not ours.text_encoder.with_projection
    assert ours.scheduler_config["timestep_spacing"] == "leading"
    io = _unet_io()
    np.testing.assert_allclose(_our_unet(ours.unet, *io), _torch_unet(pipe.unet, *io), atol=TOL)

    ids = (_ids(ours.tokenizer), _ids(ours.tokenizer_2))
    assert ids[1][0, -1] == 0 and ids[0][0, -1] == 49407  # "!" vs "<|endoftext|>" padding
    for got, want in zip(_text_outputs(ours, ids), _torch_text_outputs(pipe, ids), strict=True):
        np.testing.assert_allclose(got, want, atol=TOL)

    z = np.random.RandomState(4).randn(1, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    np.testing.assert_allclose(_vae_decode(ours.vae, z), want, atol=TOL)
    assert ours.vae.config.scaling_factor == pytest.approx(0.13025)


def test_fp16_variant(xl_folder, tmp_path):
    folder, pipe = xl_folder
    io = _unet_io()
    ids = (_ids(pipe.tokenizer), _ids(pipe.tokenizer_2))
    z = np.random.RandomState(4).randn(1, 4, 8, 8).astype(np.float32)
    with torch.no_grad():
        want_img = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
    want = [_torch_unet(pipe.unet, *io), *_torch_text_outputs(pipe, ids), want_img]

    # Beside the fp32 weights: variant="fp16" chooses the fp16 files in every subfolder, and
    # they are upcast to float32 parameters.
    sd = load_stable_diffusion(folder, variant="fp16")
    assert sd.text_encoder_2.text_projection.kernel.get_value().dtype == jnp.float32
    got = [_our_unet(sd.unet, *io), *_text_outputs(sd, ids), _vae_decode(sd.vae, z)]
    errors = _errors(got, want)
    print(f"fp16 variant: max errors (unet, te1, te2, te2 pooled, vae) {errors}")
    assert max(errors) < FP16_TOL, errors
    assert min(errors) > 0  # every network read the fp16 files, not the fp32 ones

    # A folder with the fp16 files only (as many ship): read without asking (the same rule for
    # every subfolder; checked here on the text encoders, whose loading is quick).
    def fp32_weights(_, names):
        return [n for n in names if n.endswith(".safetensors") and ".fp16." not in n]

    only = tmp_path / "fp16_only"
    shutil.copytree(folder, only, ignore=fp32_weights)
    assert not list(only.glob("*/model.safetensors"))
    only_sd = dataclasses.replace(
        sd,
        text_encoder=load_clip_text(only / "text_encoder"),
        text_encoder_2=load_clip_text(only / "text_encoder_2"),
    )
    assert _errors(_text_outputs(only_sd, ids), want[1:4]) == errors[1:4]


def test_export_round_trip_diffusers_loads_it(xl_folder, ours, tmp_path):
    _, pipe = xl_folder
    out = save_stable_diffusion(ours, tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    back = StableDiffusionXLPipeline.from_pretrained(out)
    assert back.config.force_zeros_for_empty_prompt is True
    assert isinstance(back.text_encoder_2, CLIPTextModelWithProjection)
    io = _unet_io()
    np.testing.assert_allclose(_torch_unet(back.unet, *io), _torch_unet(pipe.unet, *io), atol=1e-6)
    ids = (_ids(back.tokenizer), _ids(back.tokenizer_2))
    np.testing.assert_array_equal(ids[1], _ids(pipe.tokenizer_2))
    for a, b in zip(_torch_text_outputs(back, ids), _torch_text_outputs(pipe, ids), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    z = torch.from_numpy(np.random.RandomState(5).randn(1, 4, 8, 8).astype(np.float32))
    with torch.no_grad():
        a, b = back.vae.decode(z).sample.numpy(), pipe.vae.decode(z).sample.numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tokenizer_2_matches_an_sdxl_folder(tmp_path):
    _tokenizer(pad_token="!").save_pretrained(tmp_path / "tokenizer_2")
    folder_tok = load_tokenizer_2(tmp_path / "tokenizer_2")
    packaged = load_tokenizer_2()
    assert packaged.pad_token == "!" and packaged.pad_token_id == 0
    assert packaged.model_max_length == 77
    texts = [PROMPT, "", "a " * 100]  # padded, empty, truncated
    for tok in (folder_tok, packaged):
        got = tok(texts, padding="max_length", max_length=77, truncation=True).input_ids
        want = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2")(
            texts, padding="max_length", max_length=77, truncation=True
        ).input_ids
        assert got == want
    ids = np.asarray(got)
    # BOS, the words, EOS, then "!" (0) to 77; the truncated one ends with EOS.
    assert ids[0, :3].tolist() == [49406, 320, 1125] and 49407 in ids[0]
    eos = ids[0].tolist().index(49407)
    assert (ids[0, eos + 1 :] == 0).all() and eos + 1 < 77
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 0).all()
    assert ids[2, -1] == 49407 and (ids[2] != 0).all()


def _diffusers_latents(pipe, noise_nchw, **kw):
    with torch.no_grad():
        out = pipe(
            PROMPT,
            latents=torch.from_numpy(noise_nchw),
            height=PX,
            width=PX,
            num_inference_steps=4,
            guidance_scale=5.0,
            output_type="latent",
            **kw,
        )
    return out.images.numpy()


@pytest.mark.parametrize("negative", [None, "blurry, low quality"], ids=["zeros", "negative"])
def test_txt2img_matches_diffusers_sdxl(xl_folder, ours, negative):
    _, pipe = xl_folder
    noise = np.random.RandomState(6).randn(1, 4, PX // 2, PX // 2).astype(np.float32)
    want = _diffusers_latents(pipe, noise, negative_prompt=negative)
    got = txt2img_latents(
        ours,
        [PROMPT],
        negative_prompts=negative,
        noise=jnp.asarray(to_nhwc(noise)),
        steps=4,
        guidance=5.0,
    )
    err = np.abs(to_nchw(got) - want).max()
    print(f"max |ours - diffusers| latents ({negative=}): {err:.2e}")
    np.testing.assert_allclose(to_nchw(got), want, atol=TOL)
    # The guidance scale is used (a traced value: no new compilation).
    other = txt2img_latents(
        ours,
        PROMPT,
        negative_prompts=negative,
        noise=jnp.asarray(to_nhwc(noise)),
        steps=4,
        guidance=2.0,
    )
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3
    # diffusers' `prompt_2 or prompt`: empty second-tower prompts fall back to the first's.
    same = txt2img_latents(
        ours,
        [PROMPT],
        prompts_2="",
        negative_prompts=negative,
        negative_prompts_2="",
        noise=jnp.asarray(to_nhwc(noise)),
        steps=4,
        guidance=5.0,
    )
    np.testing.assert_allclose(np.asarray(same), np.asarray(got), atol=1e-6)
    if negative is None:  # the zeros matter: the encoded empty prompt gives other latents
        empty = dataclasses.replace(ours, force_zeros_for_empty_prompt=False)
        other = txt2img_latents(
            empty, PROMPT, noise=jnp.asarray(to_nhwc(noise)), steps=4, guidance=5.0
        )
        assert np.abs(np.asarray(other) - np.asarray(got)).max() > 1e-3


def test_txt2img_matches_diffusers_sd1(xl_folder, tmp_path):
    """SD 1.x: last_hidden_state context, the empty prompt as the default negative."""
    _, xl = xl_folder
    unet = perturb_(TorchUNet(**_diffusers(dataclasses.replace(TINY_UNET, sample_size=PX // 2))))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=xl.vae,
        text_encoder=xl.text_encoder,
        tokenizer=xl.tokenizer,
        scheduler=xl.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    # An SDXL-only flag in an SD index (hand-edited, or a converter's) has no effect.
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = True
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    sd = load_stable_diffusion(tmp_path)
    assert not sd.is_xl and not sd.force_zeros_for_empty_prompt
    noise = np.random.RandomState(7).randn(1, 4, PX // 2, PX // 2).astype(np.float32)
    for negative in (None, "blurry"):
        want = _diffusers_latents(pipe, noise, negative_prompt=negative)
        got = txt2img_latents(
            sd,
            PROMPT,
            negative_prompts=negative,
            noise=jnp.asarray(to_nhwc(noise)),
            steps=4,
            guidance=5.0,
        )
        err = np.abs(to_nchw(got) - want).max()
        print(f"SD 1.x: max |ours - diffusers| latents ({negative=}): {err:.2e}")
        np.testing.assert_allclose(to_nchw(got), want, atol=TOL)


def test_missing_text_encoder_2_is_named(xl_folder, tmp_path):
    folder, _ = xl_folder
    broken = tmp_path / "xl"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("text_encoder_2"))
    with pytest.raises(
        CheckpointFolderError, match=r"missing subfolders \['text_encoder_2'\]"
    ) as e:
        load_stable_diffusion(broken)
    assert "StableDiffusionXLPipeline" in str(e.value) and "tokenizer_2" in str(e.value)
    # A refiner's layout (no text_encoder/) is named as such, before any weight is read.
    refiner = tmp_path / "refiner"
    shutil.copytree(folder, refiner, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(CheckpointFolderError, match="An SDXL refiner .* is not supported"):
        load_stable_diffusion(refiner)
