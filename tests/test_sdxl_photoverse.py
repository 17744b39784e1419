"""PhotoVerse on SDXL: pseudo-words in both text towers, the pooled embedding and time ids, the
trainable count of the SDXL preset, the sampler's SDXL conditioning, and the SDXL config."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import face_batch
from flax import nnx

from pv_jax.models.presets import SDXL_TEXT, SDXL_TEXT_2, SDXL_UNET, TINY_VAE, VIT_H14_VISION
from pv_jax.models.sdxl import encode_sdxl_prompt
from pv_jax.photoverse import (
    FROZEN,
    TINY_CONFIG,
    PhotoVerse,
    PhotoVerseConfig,
    Preset,
    count_params,
    cross_attentions,
    photoverse_loss,
    preset_photoverse,
    split_trainable,
)
from pv_jax.photoverse.factory import random_photoverse
from pv_jax.photoverse.model import TextConditioning, default_time_ids
from pv_jax.photoverse.placeholder import inject_pseudo_words
from pv_jax.sampling import Sampler, SamplerSpec, encode_references
from pv_jax.sampling.sampler import empty_prompt_ids

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def xl():
    """Tiny random PhotoVerse on SDXL-shaped networks (two text towers of widths 64 and 96)."""
    return random_photoverse(TINY_CONFIG, "tiny_sdxl", seed=0)


def test_tokens_for_both_towers(xl):
    tok = xl.tokenizer(["a photo of S* in a garden"], 5)
    assert tok.input_ids_2 is not None
    n = int(np.argmax(tok.input_ids[0] == 49407)) + 1  # through the first EOS
    np.testing.assert_array_equal(tok.input_ids[0, :n], tok.input_ids_2[0, :n])
    assert (tok.input_ids[0, n:] == 49407).all()  # tokenizer 1 pads with EOS
    assert (tok.input_ids_2[0, n:] == 0).all()  # tokenizer 2 with "!"
    assert sorted(tok.arrays()) == ["input_ids", "input_ids_2", "slots"]
    empty = empty_prompt_ids(xl.tokenizer)
    assert sorted(empty) == ["empty_ids", "empty_ids_2"]


def test_pseudo_words_go_into_both_towers(xl):
    model = xl.model
    assert model.is_xl and model.text_widths == (64, 96)
    batch = face_batch(xl.tokenizer, ("a photo of S*", "S* smiling"))
    words, tokens = jax.jit(lambda m, r: m.encode_reference(r))(model, batch["reference"])
    chex.assert_shape(words, (2, 5, 64 + 96))
    chex.assert_shape(tokens, (2, None, 160))  # the image branch at the UNet's context width
    text = jax.jit(lambda m, b, w: m.encode_text(b["input_ids"], b["slots"], w, b["input_ids_2"]))(
        model, batch, words
    )
    chex.assert_shape(text.context, (2, 77, 160))
    chex.assert_shape(text.pooled, (2, 48))

    def by_hand(m, b, w):
        e1 = inject_pseudo_words(
            m.text_encoder.embed_tokens(b["input_ids"]), b["slots"], w[..., :64]
        )
        e2 = inject_pseudo_words(
            m.text_encoder_2.embed_tokens(b["input_ids_2"]), b["slots"], w[..., 64:]
        )
        s1 = m.text_encoder(b["input_ids"], inputs_embeds=e1)
        s2 = m.text_encoder_2(b["input_ids_2"], inputs_embeds=e2)
        # SDXL: penultimate states without the final LayerNorm; pooled = tower 2's projection.
        return jnp.concatenate([s1.hidden_states[-2], s2.hidden_states[-2]], -1), s2.text_embeds

    ctx, pooled = jax.jit(by_hand)(model, batch, words)
    np.testing.assert_allclose(text.context, ctx, atol=1e-6)
    np.testing.assert_allclose(text.pooled, pooled, atol=1e-6)
    # The words change both towers' states and the pooled embedding (the slots precede EOS).
    plain = jax.jit(
        lambda m, b: encode_sdxl_prompt(
            m.text_encoder, m.text_encoder_2, b["input_ids"], b["input_ids_2"]
        )
    )(model, batch)
    for got, ref, lo, hi in ((text.context, plain[0], 0, 64), (text.context, plain[0], 64, 160)):
        assert np.abs(np.asarray(got - ref)[..., lo:hi]).max() > 1e-3
    assert np.abs(np.asarray(text.pooled - plain[1])).max() > 1e-3
    with pytest.raises(ValueError, match="input_ids_2"):
        model.encode_text(batch["input_ids"], batch["slots"], words)


def test_time_ids_reach_the_unet(xl):
    model = xl.model
    batch = face_batch(xl.tokenizer, ("a photo of S*",))
    words, f = jax.jit(lambda m, r: m.encode_reference(r))(model, batch["reference"])
    text = jax.jit(lambda m, *a: m.encode_text(*a))(
        model, batch["input_ids"], batch["slots"], words, batch["input_ids_2"]
    )
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    run = jax.jit(lambda m, ids: m.denoise(x, 500, text, f, gamma=1.0, sigma=1.0, time_ids=ids))
    default = default_time_ids(1, (16, 16), model.latent_factor)
    np.testing.assert_array_equal(default, [[32, 32, 0, 0, 32, 32]])
    same = run(model, default)
    np.testing.assert_allclose(
        jax.jit(lambda m: m.denoise(x, 500, text, f, gamma=1.0, sigma=1.0))(model), same
    )
    other = run(model, jnp.asarray([[64.0, 48.0, 8.0, 0.0, 32.0, 32.0]]))
    assert np.abs(np.asarray(other - same)).max() > 1e-4


def test_loss_and_gradients_on_sdxl(xl):
    batch = face_batch(xl.tokenizer)
    batch["time_ids"] = np.asarray([[40, 40, 4, 0, 32, 32], [32, 32, 0, 0, 32, 32]], np.float32)
    graphdef, trainable, frozen = split_trainable(xl.model)

    @jax.jit
    def grads(trainable, frozen):
        def loss(tr):
            model = nnx.merge(graphdef, tr, frozen)
            return photoverse_loss(model, batch, jax.random.key(0), schedule=xl.schedule)

        return jax.value_and_grad(loss, has_aux=True)(trainable)

    (total, metrics), g = grads(trainable, frozen)
    assert np.isfinite(float(total)) and float(metrics["face"]) > 0
    norms = {
        jax.tree_util.keystr(p): float(jnp.abs(v).sum()) for p, v in jax.tree.leaves_with_path(g)
    }
    text_proj = [k for k in norms if "text_adapter" in k and "proj" in k and "kernel" in k]
    assert text_proj and all(norms[k] > 0 for k in text_proj)  # both towers' words learn
    assert all(np.isfinite(v) for v in norms.values())


def test_sampler_sdxl_one_compile_and_zero_uncond(xl):
    batch = face_batch(xl.tokenizer, ("a photo of S*",))
    refs = batch["reference"][:1]
    sampler = Sampler(xl.model, xl.schedule)
    noise = jax.random.normal(jax.random.key(1), (1, 16, 16, 4))
    kw = dict(
        num_words=5,
        spec=SamplerSpec(steps=3),
        decode=False,
        input_ids_2=batch["input_ids_2"],
        **empty_prompt_ids(xl.tokenizer),
    )

    def run(ids=batch["input_ids"], **more):
        return sampler(refs, ids, batch["slots"], noise=noise, key=jax.random.key(2), **kw, **more)

    a = run(guidance=5.0)
    run(guidance=3.0, gamma=0.5)
    assert sampler.traces == 1
    # Guidance 0 leaves only the unconditional pass: SDXL base's zero text input (context and
    # pooled), sigma 0. It cannot depend on the prompt, and equals the loop run by hand.
    g0 = run(guidance=0.0)
    np.testing.assert_allclose(run(ids=batch["input_ids"][:, ::-1], guidance=0.0), g0, atol=1e-6)
    assert np.abs(np.asarray(a - g0)).max() > 1e-4
    assert xl.model.force_zeros_for_empty_prompt
    model = xl.model
    words, f = jax.jit(encode_references, static_argnums=2)(model, jnp.asarray(refs), 5)
    zeros = TextConditioning(jnp.zeros((1, 77, 160)), jnp.zeros((1, 48)))
    from pv_jax.diffusion import ddim_prev_timesteps, ddim_step, ddim_timesteps

    ts = ddim_timesteps(xl.schedule, 3)
    x = noise
    # The unconditional UNet call, compiled once for the three steps (op by op it took 10 s).
    uncond = nnx.jit(lambda m, x, t: m.denoise(x, t, zeros, f, gamma=1.0, sigma=0.0, alpha=0.0))
    for t, pt in zip(ts, ddim_prev_timesteps(xl.schedule, ts), strict=True):
        x, _ = ddim_step(xl.schedule, uncond(model, x, jnp.asarray(t)), t, pt, x)
    np.testing.assert_allclose(g0, x, atol=1e-4)


def _adapter_params(in_dim: int, out_dim: int, hidden: int, blocks: int) -> int:
    dims = [in_dim] + [hidden] * blocks
    per_block = sum(a * b + b + 2 * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return per_block + hidden * out_dim + out_dim


@pytest.mark.parametrize("image_source", ["encoder", pytest.param("both", marks=pytest.mark.slow)])
def test_trainable_parameter_count_sdxl(image_source):
    spec = importlib.util.spec_from_file_location("sdxl_cfg", ROOT / "configs/photoverse_sdxl.py")
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    arg = f"image_source={image_source}"
    cfg = PhotoVerseConfig.from_dict(config_module.get_config(arg).model.to_dict())
    # Only the text widths matter to the trainable part: one layer per tower keeps it quick.
    text = dataclasses.replace(SDXL_TEXT, num_hidden_layers=1)
    text_2 = dataclasses.replace(SDXL_TEXT_2, num_hidden_layers=1)

    preset = Preset(SDXL_UNET, TINY_VAE, text, VIT_H14_VISION, text_2)  # the VAE: not counted
    model = preset_photoverse(cfg, preset, abstract=True, with_face_net=False).model
    _, trainable, _ = split_trainable(model)
    n = count_params(trainable)

    h, r, ctx = cfg.adapter.hidden, cfg.lora_rank, 2048
    # 70 cross-attention layers: down 2 x 2 (640) + 2 x 10 (1280), mid 10, up 3 x 10 + 3 x 2.
    inner = [640] * (2 * 2 + 3 * 2) + [1280] * (2 * 10 + 10 + 3 * 10)
    assert sorted(a._dims[1][1][1] for a in cross_attentions(model.unet)) == sorted(inner)
    lora = sum(2 * (ctx * r + r * d) for d in inner)  # on k and v
    image_branch = sum(2 * ctx * d for d in inner)  # W_k^S, W_v^S (no bias)
    # ViT-H/14 is 1280 wide; the words have both towers' widths 768 + 1280 = the context's.
    adapters = 5 * _adapter_params(1280, 768 + 1280, h, 2) + _adapter_params(1280, ctx, h, 2)
    if image_source == "both":  # identity tokens [ours]: Linear 128 -> h, Linear -> N x ctx, LN
        n_tok = cfg.identity_tokens
        adapters += 128 * h + h + h * n_tok * ctx + n_tok * ctx + 2 * ctx
    print(
        f"SDXL PhotoVerse ({image_source}) trainable: {n:,} = adapters {adapters:,} + LoRA "
        f"{lora:,} + image K/V {image_branch:,}"
    )
    assert n == adapters + lora + image_branch
    assert count_params(nnx.state(model.unet, FROZEN)) == 2_567_463_684  # the SDXL UNet


def test_model_rejects_mixed_bases(xl):
    m = xl.model
    with pytest.raises(ValueError, match="text_encoder_2"):
        PhotoVerse(
            TINY_CONFIG,
            unet=m.unet,
            vae=m.vae,
            text_encoder=m.text_encoder,
            image_encoder=m.image_encoder,
            text_encoder_2=None,
            rngs=nnx.Rngs(0),
        )
    # SD's choice of hidden state has no meaning on SDXL (penultimate states of both towers).
    with pytest.raises(ValueError, match="text_encoder_layer=-2 is SD's choice"):
        PhotoVerse(
            dataclasses.replace(TINY_CONFIG, text_encoder_layer=-2),
            unet=m.unet,
            vae=m.vae,
            text_encoder=m.text_encoder,
            image_encoder=m.image_encoder,
            text_encoder_2=m.text_encoder_2,
            rngs=nnx.Rngs(0),
        )


@pytest.mark.slow
def test_train_sample_and_evaluate_an_sdxl_run(tmp_path):
    """train_tpu.py on the SDXL config's tiny variant (micro-conditioned synthetic batches) with
    identity tokens beside the encoder's, then sample.py and the evaluation command on its
    checkpoint, unchanged: the checkpoint carries the image source to both."""
    import json
    import os
    import subprocess
    import sys

    import skimage.data

    astronaut = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")
    run = tmp_path / "run"
    env = dict(os.environ)
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_tpu.py"),
            "--config",
            f"{ROOT / 'configs/photoverse_sdxl.py'}:tiny,image_source=both",
            "--workdir",
            str(run),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads(train.stdout.strip().splitlines()[-1])
    assert summary["end_step"] == 4 and summary["skipped_steps"] == 0
    assert np.isfinite(summary["last_metrics"]["loss"]) and summary["last_metrics"]["face"] > 0

    out = tmp_path / "samples"
    sample = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(run), "--ref", astronaut]
        + ["--prompt", "a photo of S*", "--num-images", "2", "--steps", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    meta = json.loads((out / "samples.json").read_text())
    assert len(meta["images"]) == 2 and meta["timings"]["compile_s"] > 0
    assert meta["image_source"] == "both" and meta["tuned_from"] is None

    evaluation = subprocess.run(
        [sys.executable, "-m", "pv_jax.evaluation", "--ckpt", str(run), "--refs", astronaut]
        + ["--num-images", "1", "--steps", "2", "--out", str(tmp_path / "eval")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=ROOT,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert (
        json.loads((tmp_path / "eval" / "eval.json").read_text())["settings"]["image_source"]
        == "both"
    )


def test_build_photoverse_from_an_sdxl_folder(xl, tmp_path):
    """An SDXL pipeline folder (our export, which StableDiffusionXLPipeline loads) and a CLIP
    vision folder -> PhotoVerse on SDXL: both towers, tokenizer 2, the zero-uncond setting."""
    from conftest import tiny_sdxl_folders

    from pv_jax.models.presets import TINY_TEXT, TINY_TEXT_2
    from pv_jax.photoverse import build_photoverse

    sd, folder, vision = tiny_sdxl_folders(tmp_path, seed=5)
    bundle = build_photoverse(
        TINY_CONFIG, sd_folder=folder, clip_vision_folder=vision, with_face_net=False
    )
    model = bundle.model
    assert model.is_xl and model.force_zeros_for_empty_prompt
    assert model.text_widths == (TINY_TEXT.hidden_size, TINY_TEXT_2.hidden_size)
    np.testing.assert_array_equal(
        model.text_encoder_2.text_projection.kernel.get_value(),
        sd.text_encoder_2.text_projection.kernel.get_value(),
    )
    np.testing.assert_array_equal(
        model.unet.add_embedding.linear_1.kernel.get_value(),
        sd.unet.add_embedding.linear_1.kernel.get_value(),
    )
    tokens = bundle.tokenizer(["a photo of S*"], 5)
    assert tokens.input_ids_2 is not None and tokens.input_ids_2[0, -1] == 0  # "!" padding
    chex.assert_shape(model.text_adapter.adapters[0].proj.kernel.get_value(), (48, 160))
