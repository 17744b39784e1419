"""The PhotoVerse model: trainable partition, the UNet cross-attention (LoRA + image branch)
against direct computations and the plain UNet, random fusion, builders and config checks."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import face_batch, tiny_loss_and_grads, tiny_stable_diffusion
from flax import nnx

from pv_jax.models.attention import dot_attention
from pv_jax.models.clip import CLIPVisionModel
from pv_jax.models.layers import abstract_module
from pv_jax.models.presets import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VISION,
    TINY_UNET,
    TINY_VAE,
    TINY_VISION,
    random_module,
)
from pv_jax.models.unet import UNet2DConditionModel
from pv_jax.photoverse import (
    FROZEN,
    TINY_CONFIG,
    TRAINABLE,
    UNET_EXTRAS,
    AdapterConfig,
    IdentityAdapter,
    ImageAdapter,
    PhotoVerse,
    PhotoVerseAttention,
    PhotoVerseConfig,
    Preset,
    TextAdapter,
    build_photoverse,
    count_params,
    cross_attentions,
    photoverse_attention_cls,
    photoverse_loss,
    preset_photoverse,
    random_fusion,
    split_trainable,
)
from pv_jax.weights.convert import export_state, load_into
from pv_jax.weights.hf_folders import save_clip_vision, save_stable_diffusion


def _perturbed(model: PhotoVerse, scale: float = 0.05, seed: int = 1) -> PhotoVerse:
    """A copy whose trainable leaves are all non-zero (LoRA B starts at zero, so A's gradient
    would be zero at initialisation)."""
    graphdef, trainable, frozen = split_trainable(model)
    leaves, tree = jax.tree.flatten(trainable)
    r = np.random.RandomState(seed)  # numpy: one jax.random program per shape took a second
    leaves = [x + scale * r.randn(*x.shape).astype(np.float32) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), frozen)


def test_trainable_partition_and_gradients(tiny_pv):
    model = _perturbed(tiny_pv.model)
    _, trainable, frozen = split_trainable(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    groups = ("text_adapter.", "image_adapter.", ".lora_", ".to_k_s.", ".to_v_s.")
    assert all(any(g in "." + p for g in groups) for p in paths)
    for g in groups:
        assert any(g in "." + p for p in paths), f"no trainable {g} parameters"
    frozen_paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)]
    assert not any(any(g in "." + p for g in groups) for p in frozen_paths)
    assert count_params(nnx.state(model, FROZEN)) == count_params(frozen)
    assert count_params(nnx.state(model, TRAINABLE)) == count_params(trainable)

    batch = face_batch(tiny_pv.tokenizer)
    batch["timesteps"] = np.array([100, 250])  # <= t_face_max: every loss term is active
    batch["descriptor"] = np.random.RandomState(0).randn(2, 128).astype(np.float32)
    # One program, two pullbacks: the total loss and the face term alone (test_losses.py checks
    # the terms' values with the same program).
    _, loss_and_grads = tiny_loss_and_grads(tiny_pv)
    _, metrics, g, g_face = loss_and_grads(trainable, frozen, batch, jax.random.key(0))
    assert float(metrics["face"]) > 0
    # Gradients exist for the trainable state only (same tree), and none of them is zero.
    chex.assert_trees_all_equal_structs(g, trainable)
    for path, leaf in jax.tree.leaves_with_path(g):
        assert np.isfinite(leaf).all() and np.abs(leaf).max() > 0, jax.tree_util.keystr(path)
    # The face term alone reaches both adapters: adapters -> pseudo-words / image tokens ->
    # UNet -> x0_hat -> VAE decoder -> chip -> face net (through a rollout: test_losses.py).
    for name in ("text_adapter", "image_adapter"):
        leaves = jax.tree.leaves(g_face[name])
        assert leaves and all(np.isfinite(x).all() for x in leaves)
        assert max(float(np.abs(x).max()) for x in leaves) > 0, name


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients(tiny_pv):
    """The whole loss (image branch, LoRA, random fusion, the face loss through the decoder)
    with remat: UNet layers and VAE decoder blocks recomputed (pv_jax.models.remat)."""
    from pv_jax.photoverse import tiny_photoverse

    plain = _perturbed(tiny_pv.model)
    remat = _perturbed(tiny_photoverse(seed=0, remat=True).model)
    assert remat.unet.remat and remat.vae.remat and not plain.vae.remat
    batch = face_batch(tiny_pv.tokenizer)
    batch["timesteps"] = np.array([100, 700])

    def value_and_grad(model):
        graphdef, trainable, frozen = split_trainable(model)

        def loss(tr):
            m = nnx.merge(graphdef, tr, frozen)
            return photoverse_loss(m, batch, jax.random.key(0), schedule=tiny_pv.schedule)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    (va, ma), ga = value_and_grad(plain)
    (vb, mb), gb = value_and_grad(remat)
    assert float(ma["face"]) > 0
    np.testing.assert_allclose(float(vb), float(va), rtol=1e-5)
    chex.assert_trees_all_close(gb, ga, rtol=1e-4, atol=1e-7)


def _adapter_params(d_in: int, d_out: int, hidden: int, blocks: int) -> int:
    dims = [d_in] + [hidden] * blocks
    per_block = sum(a * b + b + 2 * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return per_block + hidden * d_out + d_out


@pytest.mark.parametrize("image_source", ["encoder", "identity", "both"])
def test_trainable_parameter_count_sd15(image_source):
    """configs/photoverse_sd15.py's trainable part, counted from shapes, equals the sum of its
    pieces; identity tokens [ours] add their projection (and drop the image adapter alone)."""
    from configs import photoverse_sd15

    arg = f"image_source={image_source}"
    cfg = PhotoVerseConfig.from_dict(photoverse_sd15.get_config(arg).model.to_dict())
    unet_cfg, vision_cfg = SD15_UNET, SD15_VISION  # SD1.5 and CLIP ViT-L/14
    # Only the text width matters to the trainable part: one layer keeps the build quick.
    text_cfg = dataclasses.replace(SD15_TEXT, num_hidden_layers=1)

    # Shapes only, fast; the VAE is frozen, not counted here.
    preset = Preset(unet_cfg, TINY_VAE, text_cfg, vision_cfg)
    model = preset_photoverse(cfg, preset, abstract=True, with_face_net=False).model
    _, trainable, _ = split_trainable(model)
    n = count_params(trainable)

    h, r, ctx = cfg.adapter.hidden, cfg.lora_rank, 768
    # 16 cross-attention layers: inner width 320 x5, 640 x5, 1280 x6 (down 2+2+2, mid 1, up 3x3).
    inner = [320] * 5 + [640] * 5 + [1280] * 6
    assert sorted(a._dims[1][1][1] for a in cross_attentions(model.unet)) == sorted(inner)
    lora = sum(2 * (ctx * r + r * d) for d in inner)  # on k and v
    image_branch = sum(2 * ctx * d for d in inner)  # W_k^S, W_v^S (no bias)
    adapters = 5 * _adapter_params(1024, 768, h, 2)  # the text adapter's 5 words
    if image_source != "identity":
        adapters += _adapter_params(1024, 768, h, 2)  # the image adapter
    if image_source != "encoder":  # Linear 128 -> h, GELU, Linear h -> N x 768, LayerNorm
        n_tok = cfg.identity_tokens
        adapters += 128 * h + h + h * n_tok * ctx + n_tok * ctx + 2 * ctx
    print(
        f"SD1.5 PhotoVerse ({image_source}) trainable: {n:,} = adapters {adapters:,} + LoRA "
        f"{lora:,} + image K/V {image_branch:,}"
    )
    assert n == adapters + lora + image_branch
    if image_source == "encoder":
        assert n == 36_908_544  # docs/photoverse.md's number
    assert count_params(nnx.state(model.unet, FROZEN)) == 859_520_964  # the SD1.5 UNet


def _unet_pair(seed: int = 0):
    """A PhotoVerse UNet (LoRA B = 0) and a plain UNet with the same base weights."""
    pv = random_module(
        lambda r: UNet2DConditionModel(
            TINY_UNET, cross_attention_cls=photoverse_attention_cls(TINY_CONFIG), rngs=r
        ),
        np.random.default_rng(seed),
        skip=UNET_EXTRAS,
    )
    for attn in cross_attentions(pv):
        attn.reset_photoverse_params(nnx.Rngs(seed))
    plain = abstract_module(lambda r: UNet2DConditionModel(TINY_UNET, rngs=r))
    base = export_state(pv, skip=UNET_EXTRAS)
    plain = load_into(plain, {k: (lambda v=v: v) for k, v in base.items()}, what="UNet")
    return pv, plain


def _unet_inputs(b: int = 2):
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(b, 16, 16, 4).astype(np.float32))
    ctx = jnp.asarray(r.randn(b, 9, 64).astype(np.float32))
    f = jnp.asarray(r.randn(b, 17, 64).astype(np.float32))
    return x, jnp.array([10, 700][:b]), ctx, f


_unet = jax.jit(lambda m, x, t, c, kw: m(x, t, c, cross_attention_kwargs=kw))


def _knobs(image_tokens, gamma=1.0, sigma=1.0, alpha=1.0) -> dict:
    """cross_attention_kwargs with per-sample (2,) knobs: one pytree shape (one compile of
    ``_unet``) with image tokens and one without, whatever the values."""
    knobs = dict(gamma=gamma, sigma=sigma, alpha=alpha)
    return dict(image_tokens=image_tokens, **{k: jnp.full(2, v) for k, v in knobs.items()})


def test_unet_equals_plain_unet_without_image_branch_and_zero_lora():
    pv, plain = _unet_pair()
    x, t, ctx, f = _unet_inputs()
    want = np.asarray(_unet(plain, x, t, ctx, None))
    # No image tokens, gamma = 1, LoRA B = 0: bit-identical to the plain UNet.
    got = _unet(pv, x, t, ctx, _knobs(None, gamma=1.0, sigma=0.0))
    np.testing.assert_array_equal(np.asarray(got), want)
    # Image tokens present but sigma = 0 (per sample): still identical.
    got = _unet(pv, x, t, ctx, _knobs(f, gamma=1.0, sigma=0.0))
    np.testing.assert_array_equal(np.asarray(got), want)
    # Non-zero LoRA changes the output; alpha = 0 switches it off exactly.
    for attn in cross_attentions(pv):
        for lora in (attn.lora_k, attn.lora_v):
            lora.lora_b.set_value(
                jnp.full(lora.lora_b.shape, 0.05, jnp.float32)
            )  # not weak-typed: no recompile
    lora_on = np.asarray(_unet(pv, x, t, ctx, _knobs(None, sigma=0.0)))
    assert np.abs(lora_on - want).max() > 1e-3
    got = _unet(pv, x, t, ctx, _knobs(None, sigma=0.0, alpha=0.0))
    np.testing.assert_array_equal(np.asarray(got), want)
    # sigma > 0 with image tokens changes it too.
    with_image = _unet(pv, x, t, ctx, _knobs(f, sigma=1.0, alpha=0.0))
    assert np.abs(np.asarray(with_image) - want).max() > 1e-3


@pytest.mark.parametrize("targets", [("k", "v"), ("q", "k", "v", "out")])
def test_cross_attention_matches_direct_computation(targets):
    r = np.random.RandomState(0)
    attn = PhotoVerseAttention(
        16,
        context_dim=12,
        heads=2,
        dim_head=8,
        attention="blocked",
        lora_targets=targets,
        rngs=nnx.Rngs(0),
    )
    for name in targets:
        lora = getattr(attn, f"lora_{name}")
        lora.lora_b.set_value(jnp.asarray(r.randn(*lora.lora_b.shape).astype(np.float32)) * 0.1)
    for name in {"q", "k", "v", "out"} - set(targets):
        assert getattr(attn, f"lora_{name}") is None
    x, c, f = (
        jnp.asarray(r.randn(2, n, d).astype(np.float32)) for n, d in ((5, 16), (7, 12), (3, 12))
    )
    gamma, sigma, alpha = jnp.array([2.0, 0.5]), jnp.array([0.0, 1.5]), 0.7
    got = jax.jit(lambda m, *a, **k: m(*a, **k))(
        attn, x, c, image_tokens=f, gamma=gamma, sigma=sigma, alpha=alpha
    )

    def w(lin):
        return np.asarray(lin.kernel.get_value())

    def heads(a):
        return jnp.asarray(a).reshape(*a.shape[:-1], 2, 8)

    def lora(m):
        if m is None:
            return 0.0
        return np.asarray(m.lora_a.get_value()) @ np.asarray(m.lora_b.get_value())

    q = np.asarray(x) @ (w(attn.to_q) + alpha * lora(attn.lora_q))
    k_t = np.asarray(c) @ (w(attn.to_k) + alpha * lora(attn.lora_k))
    v_t = np.asarray(c) @ (w(attn.to_v) + alpha * lora(attn.lora_v))
    k_s, v_s = np.asarray(f) @ w(attn.to_k_s), np.asarray(f) @ w(attn.to_v_s)
    o_t = np.asarray(dot_attention(heads(q), heads(k_t), heads(v_t))).reshape(2, 5, 16)
    o_s = np.asarray(dot_attention(heads(q), heads(k_s), heads(v_s))).reshape(2, 5, 16)
    o = np.asarray(gamma)[:, None, None] * o_t + np.asarray(sigma)[:, None, None] * o_s
    want = o @ (w(attn.to_out[0]) + alpha * lora(attn.lora_out))
    want = want + np.asarray(attn.to_out[0].bias.get_value())
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_image_branch_initialised_from_text_keys_and_values(tiny_pv):
    for attn in cross_attentions(tiny_pv.model.unet):
        np.testing.assert_array_equal(attn.to_k_s.kernel.get_value(), attn.to_k.kernel.get_value())
        np.testing.assert_array_equal(attn.to_v_s.kernel.get_value(), attn.to_v.kernel.get_value())
        assert not np.asarray(attn.lora_k.lora_b.get_value()).any()
        assert np.asarray(attn.lora_k.lora_a.get_value()).std() > 0


def test_zero_image_branch_init_starts_silent():
    # image_branch_init="zero": W_k^S = W_k, W_v^S = 0, so with image tokens at any sigma the
    # UNet equals the plain one at the start (ControlNet's zero init), and W_v^S has a gradient.
    pv, plain = _unet_pair()
    for attn in cross_attentions(pv):
        attn.reset_photoverse_params(nnx.Rngs(0), "zero")
        np.testing.assert_array_equal(attn.to_k_s.kernel.get_value(), attn.to_k.kernel.get_value())
        assert not np.asarray(attn.to_v_s.kernel.get_value()).any()
    x, t, ctx, f = _unet_inputs()
    want = np.asarray(_unet(plain, x, t, ctx, None))
    got = _unet(pv, x, t, ctx, _knobs(f, gamma=1.0, sigma=2.0))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)

    graphdef, extras, rest = nnx.split(pv, UNET_EXTRAS, ...)

    def out(extras):
        m = nnx.merge(graphdef, extras, rest)
        return jnp.sum(m(x, t, ctx, cross_attention_kwargs=dict(image_tokens=f, sigma=1.0)))

    grads = jax.jit(jax.grad(out))(extras)  # compiled once: op by op it took a minute
    v_grad = [g for p, g in nnx.to_flat_state(grads) if "to_v_s" in str(p)]
    assert v_grad and all(np.abs(np.asarray(g.get_value())).max() > 0 for g in v_grad)


def test_random_fusion_frequencies():
    cfg = PhotoVerseConfig()
    gamma, sigma = jax.jit(lambda k: random_fusion(k, 200_000, cfg))(jax.random.key(0))
    gamma, sigma = np.asarray(gamma), np.asarray(sigma)
    pairs = {(2.0, 0.0): 0, (0.0, 2.0): 0, (1.0, 1.0): 0}
    for pair in pairs:
        pairs[pair] = float(np.mean((gamma == pair[0]) & (sigma == pair[1])))
    assert sum(pairs.values()) == pytest.approx(1.0)
    for freq in pairs.values():
        assert abs(freq - 1 / 3) < 0.005  # 200k draws: standard error ~0.001
    other = random_fusion(jax.random.key(1), 200_000, cfg)[0]
    assert (np.asarray(other) != gamma).any()  # per-sample draws depend on the key


def test_build_photoverse_from_folders(tmp_path):
    sd_folder = save_stable_diffusion(tiny_stable_diffusion(3), tmp_path / "sd")
    vision = random_module(lambda r: CLIPVisionModel(TINY_VISION, rngs=r), np.random.default_rng(0))
    vision_folder = save_clip_vision(vision, tmp_path / "clip-vision")
    bundle = build_photoverse(
        TINY_CONFIG, sd_folder=sd_folder, clip_vision_folder=vision_folder, with_face_net=False
    )
    model = bundle.model
    # Base weights come from the folders; the additions are initialised.
    np.testing.assert_array_equal(
        model.image_encoder.embeddings.class_embedding.get_value(),
        vision.embeddings.class_embedding.get_value(),
    )
    ref = tiny_stable_diffusion(3).unet
    attn = cross_attentions(model.unet)[0]
    np.testing.assert_array_equal(
        attn.to_k.kernel.get_value(),
        ref.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.kernel.get_value(),
    )
    np.testing.assert_array_equal(attn.to_k_s.kernel.get_value(), attn.to_k.kernel.get_value())
    assert bundle.tokenizer.placeholder_id == 49408
    assert model.face_net is None
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion folder"):
        build_photoverse(TINY_CONFIG, sd_folder=tmp_path, clip_vision_folder=vision_folder)


def test_config_errors():
    with pytest.raises(ValueError, match="text_input='patch' is not one of"):
        PhotoVerseConfig(text_input="patch")
    with pytest.raises(ValueError, match="lora_targets='w' is not one of"):
        PhotoVerseConfig(lora_targets=("k", "w"))
    with pytest.raises(ValueError, match="num_words must be in 1..5"):
        PhotoVerseConfig(num_words=6)
    with pytest.raises(ValueError, match="unknown PhotoVerse config fields \\['rank'\\]"):
        PhotoVerseConfig.from_dict({"rank": 4})
    cfg = PhotoVerseConfig.from_dict(
        {"text_layers": [3, 1], "adapter": {"hidden": 16}, "lora_targets": ["q", "k", "v", "out"]}
    )
    assert cfg.text_layers == (3, 1) and cfg.adapter.hidden == 16
    assert PhotoVerseConfig.from_dict(cfg.to_dict()) == cfg


def test_model_checks_layers_and_widths(tiny_pv):
    m = tiny_pv.model
    parts = dict(vae=m.vae, text_encoder=m.text_encoder, image_encoder=m.image_encoder)
    with pytest.raises(ValueError, match=r"CLIP-vision layers \[24\] do not exist"):
        PhotoVerse(
            dataclasses.replace(TINY_CONFIG, text_layers=(24,)),
            unet=m.unet,
            rngs=nnx.Rngs(0),
            **parts,
        )
    plain = abstract_module(lambda r: UNet2DConditionModel(TINY_UNET, rngs=r))
    with pytest.raises(ValueError, match="no PhotoVerse cross-attention"):
        PhotoVerse(TINY_CONFIG, unet=plain, rngs=nnx.Rngs(0), **parts)


def test_fewer_pseudo_words_at_inference(tiny_pv):
    batch = face_batch(tiny_pv.tokenizer)
    run = jax.jit(lambda m, ref, n: m.encode_reference(ref, n), static_argnums=2)
    words5, f = run(tiny_pv.model, batch["reference"], 5)
    words1, f1 = run(tiny_pv.model, batch["reference"], 1)
    chex.assert_shape(words5, (2, 5, 64))
    chex.assert_shape(words1, (2, 1, 64))
    chex.assert_shape(f, (2, 17, 64))  # all 1 + 16 tokens of the tiny tower
    np.testing.assert_allclose(np.asarray(words1[:, 0]), np.asarray(words5[:, 0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(f))


@pytest.mark.parametrize("text_input", ["cls", "cls_mean"])
def test_parity_adapters_vs_torch(text_input):
    """Adapters vs the same layers in PyTorch (Linear, LayerNorm, LeakyReLU); fp32, 1e-5."""
    import torch

    cfg = PhotoVerseConfig(
        text_layers=(2, 1), text_input=text_input, adapter=AdapterConfig(hidden=24)
    )
    text = TextAdapter(cfg, 16, 12, rngs=nnx.Rngs(0))
    r = np.random.RandomState(0)
    states = tuple(r.randn(3, 5, 16).astype(np.float32) for _ in range(3))
    for adapter in text.adapters:  # LayerNorms start at (1, 0): make them count
        for block in adapter.blocks:
            n = block.norm.scale.shape
            block.norm.scale.set_value(jnp.asarray(1 + 0.1 * r.randn(*n).astype(np.float32)))
            block.norm.bias.set_value(jnp.asarray(0.1 * r.randn(*n).astype(np.float32)))

    def torch_adapter(adapter):
        mods = []
        for block in adapter.blocks:
            lin = torch.nn.Linear(*block.linear.kernel.shape)
            lin.weight.data = torch.from_numpy(np.asarray(block.linear.kernel.get_value()).T)
            lin.bias.data = torch.from_numpy(np.asarray(block.linear.bias.get_value()))
            norm = torch.nn.LayerNorm(block.linear.kernel.shape[1], eps=1e-5)
            norm.weight.data = torch.from_numpy(np.asarray(block.norm.scale.get_value()))
            norm.bias.data = torch.from_numpy(np.asarray(block.norm.bias.get_value()))
            mods += [lin, norm, torch.nn.LeakyReLU(0.01)]
        proj = torch.nn.Linear(*adapter.proj.kernel.shape)
        proj.weight.data = torch.from_numpy(np.asarray(adapter.proj.kernel.get_value()).T)
        proj.bias.data = torch.from_numpy(np.asarray(adapter.proj.bias.get_value()))
        return torch.nn.Sequential(*mods, proj)

    refs = [torch_adapter(a) for a in text.adapters]
    got = np.asarray(text(tuple(map(jnp.asarray, states))))
    chex.assert_shape(got, (3, 2, 12))
    for j, layer in enumerate(cfg.text_layers):
        s = states[layer]
        x = s[:, 0] if text_input == "cls" else np.concatenate([s[:, 0], s[:, 1:].mean(1)], -1)
        with torch.no_grad():
            want = refs[j](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got[:, j], want, atol=1e-5)


@pytest.mark.parametrize(("tokens", "count"), [("all", 5), ("patches", 4), ("cls", 1)])
def test_image_adapter_token_choice(tokens, count):
    cfg = PhotoVerseConfig(image_tokens=tokens, image_layer=-2, adapter=AdapterConfig(hidden=8))
    adapter = ImageAdapter(cfg, 16, 12, rngs=nnx.Rngs(0))
    r = np.random.RandomState(0)
    states = tuple(jnp.asarray(r.randn(2, 5, 16).astype(np.float32)) for _ in range(4))
    out = adapter(states)
    chex.assert_shape(out, (2, count, 12))
    want = adapter.adapter(
        states[-2][:, {"all": slice(None), "patches": slice(1, None)}.get(tokens, slice(0, 1))]
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_per_group_learning_rates(tiny_pv):
    from pv_jax.photoverse.model import TRAINABLE_GROUPS, trainable_group
    from pv_jax.train.step import make_optimizer

    _, trainable, _ = split_trainable(tiny_pv.model)
    groups = {trainable_group(p) for p, _ in nnx.to_flat_state(trainable)}
    assert groups == set(TRAINABLE_GROUPS) - {"identity_adapter"}  # image_source "encoder"
    grads = jax.tree.map(jnp.ones_like, trainable)

    def updates(**kw):
        tx = make_optimizer(1e-3, weight_decay=0.0, **kw)
        # Jitted: op by op the update compiled 130 small programs.
        u, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(trainable), trainable)
        return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(u)}

    plain, scaled = updates(), updates(lr_multipliers={"image_adapter": 4.0, "to_v_s": 0.5})
    for path, u in plain.items():
        factor = 4.0 if "image_adapter" in path else 0.5 if "to_v_s" in path else 1.0
        np.testing.assert_allclose(scaled[path], factor * u, rtol=1e-6)
    with pytest.raises(ValueError, match=r"unknown groups \['unet'\].*image_adapter"):
        make_optimizer(1e-3, lr_multipliers={"unet": 2.0})


def test_identity_adapter_parity_vs_torch():
    """The identity projection vs the same layers in PyTorch (IP-Adapter-FaceID's MLPProjModel:
    Linear, exact GELU, Linear, LayerNorm per token); fp32, 1e-5."""
    import torch

    cfg = PhotoVerseConfig(image_source="identity", identity_tokens=3, adapter=AdapterConfig(24))
    ident = IdentityAdapter(cfg, 12, rngs=nnx.Rngs(0))
    r = np.random.RandomState(0)
    n = ident.norm.scale.shape
    ident.norm.scale.set_value(jnp.asarray(1 + 0.1 * r.randn(*n).astype(np.float32)))
    ident.norm.bias.set_value(jnp.asarray(0.1 * r.randn(*n).astype(np.float32)))
    desc = (0.1 * r.randn(4, 128)).astype(np.float32)

    def lin(layer):
        t = torch.nn.Linear(*layer.kernel.shape)
        t.weight.data = torch.from_numpy(np.asarray(layer.kernel.get_value()).T)
        t.bias.data = torch.from_numpy(np.asarray(layer.bias.get_value()))
        return t

    norm = torch.nn.LayerNorm(12, eps=1e-5)
    norm.weight.data = torch.from_numpy(np.asarray(ident.norm.scale.get_value()))
    norm.bias.data = torch.from_numpy(np.asarray(ident.norm.bias.get_value()))
    with torch.no_grad():
        x = torch.from_numpy(desc)
        x = x * np.sqrt(128) / (x.norm(dim=-1, keepdim=True) + 1e-6)
        want = norm(lin(ident.fc2)(torch.nn.GELU()(lin(ident.fc1)(x))).reshape(4, 3, 12)).numpy()
    got = np.asarray(ident(jnp.asarray(desc)))
    chex.assert_shape(got, (4, 3, 12))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Only the descriptor's direction counts (dlib compares descriptors by distance, and the
    # norms of real ones vary little): a rescaled descriptor gives the same tokens.
    np.testing.assert_allclose(np.asarray(ident(jnp.asarray(3 * desc))), got, atol=1e-5)
    with pytest.raises(ValueError, match=r"descriptors of shape \(B, 128\), got \(4, 64\)"):
        ident(jnp.asarray(desc[:, :64]))


@pytest.mark.parametrize(("source", "count"), [("identity", 3), ("both", 17 + 3)])
def test_identity_tokens_in_the_image_branch(source, count):
    """image_source "identity" / "both": the image branch reads N tokens from the reference's
    dlib descriptor (after the encoder's 17 with "both"); they follow the descriptor, the
    trainable groups hold the new adapter (and no unused one), and a model that needs
    descriptors says so when given none."""
    from pv_jax.photoverse import tiny_photoverse
    from pv_jax.photoverse.model import trainable_group

    cfg = dataclasses.replace(TINY_CONFIG, image_source=source, identity_tokens=3)
    bundle = tiny_photoverse(cfg, seed=0, with_face_net=False)
    model = bundle.model
    batch = face_batch(bundle.tokenizer)
    desc = np.random.RandomState(1).randn(2, 128).astype(np.float32)
    run = jax.jit(lambda m, ref, d: m.encode_reference(ref, descriptors=d))
    words, f = run(model, batch["reference"], desc)
    chex.assert_shape(words, (2, 5, 64))
    chex.assert_shape(f, (2, count, 64))
    _, f_other = run(model, batch["reference"], desc[::-1].copy())
    ident = slice(count - 3, count)
    np.testing.assert_allclose(np.asarray(f_other[0, ident]), np.asarray(f[1, ident]), atol=1e-6)
    assert np.abs(np.asarray(f_other[0, ident] - f[0, ident])).max() > 1e-2
    if source == "both":  # the encoder's tokens do not see the descriptor
        np.testing.assert_array_equal(np.asarray(f_other[:, :17]), np.asarray(f[:, :17]))
    _, trainable, _ = split_trainable(model)
    groups = {trainable_group(p) for p, _ in nnx.to_flat_state(trainable)}
    assert "identity_adapter" in groups
    assert ("image_adapter" in groups) == (source == "both")
    with pytest.raises(ValueError, match=f"image_source='{source}' reads the references' dlib"):
        model.encode_reference(batch["reference"])
    with pytest.raises(ValueError, match="needs identity_tokens >= 1, got 0"):
        dataclasses.replace(cfg, identity_tokens=0)
    with pytest.raises(ValueError, match="image_source='clip' is not one of"):
        dataclasses.replace(cfg, image_source="clip")
