"""SDXL networks: the text_time UNet, OpenCLIP bigG text tower, the SDXL VAE and conditioning.

Parity with diffusers/transformers (PyTorch) on tiny SDXL-shaped configs derived from the
presets; the full-size SDXL configs are checked structurally only (abstract NNX modules against
torch modules on the meta device: nothing is materialised).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import _diffusers_kwargs, perturb_, to_nchw, to_nhwc, torch_source
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from transformers import CLIPTextConfig as TorchTextConfig
from transformers import CLIPTextModel as TorchTextModel
from transformers import (
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)
from transformers import CLIPVisionConfig as TorchVisionConfig

from pv_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionModel
from pv_jax.models.layers import abstract_module
from pv_jax.models.presets import (
    SDXL_TEXT,
    SDXL_TEXT_2,
    SDXL_UNET,
    SDXL_VAE,
    TINY_SDXL_UNET,
    TINY_SDXL_VAE,
    TINY_TEXT,
    TINY_TEXT_2,
    TINY_UNET,
    VIT_H14_VISION,
)
from pv_jax.models.sdxl import encode_sdxl_prompt, sdxl_time_ids
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.models.vae import AutoencoderKL, VAEConfig
from pv_jax.weights.convert import (
    CLIP_IGNORE,
    CLIP_RULES,
    CLIP_TEXT_STRIP_PREFIXES,
    DEFAULT_RULES,
    load_into,
    to_flax_layout,
    torch_key,
)

# fp32 max-abs error bound vs diffusers/transformers. Achieved: UNet 3.0e-6 (tiny SDXL) and
# 4.0e-6 (3 levels, gelu), outputs up to ~2.3; text tower 2 hidden_states[-2] 1.8e-6,
# text_embeds 1.7e-6; encode_sdxl_prompt context 1.9e-6, pooled 1.6e-6; VAE decode 4.4e-6
# (|x| ~ 3). The fp16-configured VAE, upcast, equals the fp32 one exactly.
TOL = 1e-4

# The tiny SDXL UNet (plain first level, 2 transformer layers in the second, heads (2, 4),
# linear projections, text_time embedding of a 48-wide pooled embedding and 6 time ids).
TINY_SDXL = _diffusers_kwargs(TINY_SDXL_UNET)
# Three levels with transformer layers (1, 1, 2) -- the mid block and the first up block take
# the last entry, 2 -- heads per block, per-block resnet counts, a non-silu activation (the
# add_embedding is silu whatever act_fn: diffusers builds it with TimestepEmbedding's default),
# and the other sinusoid convention, which the time ids share with the timestep.
TINY_SDXL_DEEP = _diffusers_kwargs(
    TINY_SDXL_UNET,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 48),
    layers_per_block=(2, 1, 1),
    attention_head_dim=(1, 2, 3),
    transformer_layers_per_block=(1, 1, 2),
    act_fn="gelu",
    flip_sin_to_cos=False,
    freq_shift=1,
)

# SDXL base 1.0's unet/config.json and vae/config.json, as published (upcast_attention: null).
SDXL_UNET_JSON = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

BOS, EOS = 49406, 49407  # CLIP tokenizer's special ids

# XLA's CPU backend at optimisation level 0 compiles the tiny UNets in 3-6 s instead of 16-25 s
# (2 CPU cores); the parity errors are the same.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn):
    return jax.jit(fn, compiler_options=_FAST_COMPILE)


apply = _jit(lambda m, *a, **kw: m(*a, **kw))


def _params(module) -> list:
    return nnx.to_flat_state(nnx.state(module, nnx.Param))


def _count(module) -> int:
    return sum(int(np.prod(v.get_value().shape)) for _, v in _params(module))


def _flax_shape(torch_shape: tuple, layout: str, ndim: int) -> tuple:
    """The flax shape of a torch tensor shape by the import layout rule, materialising nothing
    (a zero-strided view of one element)."""
    view = np.broadcast_to(np.empty((), np.bool_), torch_shape)
    return tuple(to_flax_layout(view, layout, ndim).shape)


def _assert_structure(module, torch_module, rules, torch_name=lambda k: k, ignore=()):
    """Every parameter of ``module`` has its torch tensor (by ``rules``) with the shape the
    layout rule gives, and every torch tensor is used."""
    want = {
        k: tuple(v.shape)
        for k, v in torch_module.state_dict().items()
        if not any(k.endswith(s) for s in ignore)
    }
    got = {}
    for path, var in _params(module):
        key, layout = torch_key(".".join(map(str, path)), rules)
        key = torch_name(key)
        shape = tuple(var.get_value().shape)
        assert key in want, f"{key} (ours {'.'.join(map(str, path))}) missing in torch"
        assert _flax_shape(want[key], layout, len(shape)) == shape, (key, want[key], shape)
        got[key] = shape
    assert sorted(got) == sorted(want)


# ---------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------


def _unet_pair(cfg: dict, seed: int = 0) -> tuple[TorchUNet, UNet2DConditionModel]:
    torch.manual_seed(seed)
    ref = perturb_(TorchUNet(**cfg), seed=seed)
    ours_cfg = UNetConfig.from_diffusers(dict(ref.config))
    abstract = abstract_module(lambda r: UNet2DConditionModel(ours_cfg, rngs=r))
    return ref, load_into(abstract, torch_source(ref), what="UNet")


def _unet_inputs(cfg: dict, batch: int = 2):
    r = np.random.RandomState(1)
    s = cfg["sample_size"]
    x = r.randn(batch, cfg["in_channels"], s, s).astype(np.float32)
    ctx = r.randn(batch, 7, cfg["cross_attention_dim"]).astype(np.float32)
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    pooled = r.randn(batch, pooled_dim).astype(np.float32)
    # Realistic micro-conditioning, different per sample: sinusoids of sizes up to 1024.
    time_ids = sdxl_time_ids([[1024, 1024], [768, 512]], [[0, 0], [16, 32]], (1024, 1024))
    return x, ctx, pooled, time_ids


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """PyTorch on one thread: the tiny reference models run 20-50x faster than on two threads
    when the two CPU cores are shared (3 s vs 0.06 s for a tiny UNet call under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cfg", [TINY_SDXL, TINY_SDXL_DEEP], ids=["sdxl", "sdxl-3-levels-gelu"])
def test_parity_sdxl_unet(cfg):
    ref, ours = _unet_pair(cfg)
    x, ctx, pooled, time_ids = _unet_inputs(cfg)
    errs = []
    for t in (np.array([10, 900]), np.array([999, 1])):
        with torch.no_grad():
            want = ref(
                torch.from_numpy(x),
                torch.from_numpy(t),
                torch.from_numpy(ctx),
                added_cond_kwargs={
                    "text_embeds": torch.from_numpy(pooled),
                    "time_ids": torch.from_numpy(time_ids),
                },
            ).sample.numpy()
        got = apply(
            ours,
            jnp.asarray(to_nhwc(x)),
            jnp.asarray(t),
            jnp.asarray(ctx),
            text_embeds=jnp.asarray(pooled),
            time_ids=jnp.asarray(time_ids),
        )
        chex.assert_shape(got, (2, cfg["sample_size"], cfg["sample_size"], cfg["out_channels"]))
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(to_nchw(got), want, atol=TOL, rtol=0)
        errs.append(np.abs(to_nchw(got) - want).max())
    # The added embedding matters: other time ids change the output beyond the tolerance.
    other = apply(
        ours,
        jnp.asarray(to_nhwc(x)),
        jnp.asarray(t),
        jnp.asarray(ctx),
        text_embeds=jnp.asarray(pooled),
        time_ids=jnp.asarray(time_ids[::-1]),
    )
    assert np.abs(np.asarray(other) - np.asarray(got)).max() > 100 * TOL


def test_sdxl_unet_per_block_layers_and_heads():
    """transformer_layers_per_block (1, 1, 2): the mid block takes the last entry, up blocks the
    reversed list; attention heads follow attention_head_dim per block, reversed on the way up;
    resnets follow layers_per_block (2, 1, 1), plus one on the way up."""
    cfg = UNetConfig.from_diffusers(TINY_SDXL_DEEP)
    m = abstract_module(lambda r: UNet2DConditionModel(cfg, rngs=r))

    def layout(block):
        if block.attentions is None:
            return len(block.resnets), None
        heads = {
            (len(t.transformer_blocks), b.attn1.heads, b.attn2.heads)
            for t in block.attentions
            for b in t.transformer_blocks
        }
        assert len(heads) == 1
        return len(block.resnets), heads.pop()

    assert [layout(b) for b in m.down_blocks] == [(2, None), (1, (1, 2, 2)), (1, (2, 3, 3))]
    assert layout(m.mid_block) == (2, (2, 3, 3))
    assert [layout(b) for b in m.up_blocks] == [(2, (2, 3, 3)), (2, (1, 2, 2)), (3, None)]
    assert m.add_embedding.linear_1.in_features == 6 * 8 + 48


def _trace(module, *args, **kwargs):
    """The output shape of ``module(*args, **kwargs)``, traced abstractly (nothing runs)."""
    return nnx.eval_shape(lambda m: m(*args, **kwargs), module)


def test_sdxl_unet_needs_text_embeds_and_time_ids():
    ours = abstract_module(lambda r: UNet2DConditionModel(TINY_SDXL_UNET, rngs=r))
    x, ctx, pooled, time_ids = _unet_inputs(TINY_SDXL)
    x, ctx, pooled, time_ids = map(jnp.asarray, (to_nhwc(x), ctx, pooled, time_ids))
    t = jnp.array([10, 900])
    assert _trace(ours, x, t, ctx, text_embeds=pooled, time_ids=time_ids).shape == x.shape
    with pytest.raises(ValueError, match="text_embeds"):
        _trace(ours, x, t, ctx)
    with pytest.raises(ValueError, match="text_embeds"):
        _trace(ours, x, t, ctx, time_ids=time_ids)
    with pytest.raises(ValueError, match="time_ids"):
        _trace(ours, x, t, ctx, text_embeds=pooled)
    with pytest.raises(ValueError, match=r"text_embeds of shape \(2, 48\), got \(2, 40\)"):
        _trace(ours, x, t, ctx, text_embeds=pooled[:, :40], time_ids=time_ids)
    with pytest.raises(ValueError, match=r"time_ids of shape \(2, 6\), got \(1, 6\)"):
        _trace(ours, x, t, ctx, text_embeds=pooled, time_ids=time_ids[:1])
    assert (TINY_SDXL_UNET.pooled_text_dim, TINY_SDXL_UNET.time_ids_dim) == (48, 6)

    plain = abstract_module(lambda r: UNet2DConditionModel(TINY_UNET, rngs=r))
    assert plain.add_embedding is None
    assert (TINY_UNET.pooled_text_dim, TINY_UNET.time_ids_dim) == (0, 0)
    s = TINY_UNET.sample_size
    xs = jnp.zeros((2, s, s, TINY_UNET.in_channels))
    cs = jnp.zeros((2, 7, TINY_UNET.cross_attention_dim))
    assert _trace(plain, xs, t, cs).shape == xs.shape
    for extra in ({"text_embeds": pooled}, {"time_ids": time_ids}):
        with pytest.raises(ValueError, match="text_embeds/time_ids"):
            _trace(plain, xs, t, cs, **extra)


def test_sdxl_unet_config_validation():
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_diffusers(dict(TINY_SDXL, addition_embed_type="text"))
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        dataclasses.replace(TINY_SDXL_UNET, addition_time_embed_dim=None)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        dataclasses.replace(TINY_SDXL_UNET, projection_class_embeddings_input_dim=6 * 8)


def test_sdxl_unet_structure_matches_diffusers():
    """The full SDXL UNet built abstractly: diffusers' parameter count and every shape."""
    ours = abstract_module(lambda r: UNet2DConditionModel(SDXL_UNET, rngs=r))
    assert _count(ours) == 2_567_463_684
    with torch.device("meta"):
        ref = TorchUNet(**_diffusers_kwargs(SDXL_UNET))
    assert sum(p.numel() for p in ref.parameters()) == 2_567_463_684
    _assert_structure(ours, ref, DEFAULT_RULES)


def test_sdxl_unet_config_round_trip():
    # Through diffusers: our config -> diffusers' model config -> ours.
    with torch.device("meta"):
        ref = TorchUNet(**_diffusers_kwargs(SDXL_UNET))
    assert UNetConfig.from_diffusers(dict(ref.config)) == SDXL_UNET
    # The published config.json: upcast_attention null (dropped: the field's default, False).
    cfg = UNetConfig.from_diffusers(SDXL_UNET_JSON)
    assert cfg == SDXL_UNET and cfg.upcast_attention is False
    assert UNetConfig.from_diffusers(dict(SDXL_UNET_JSON, upcast_attention=True)).upcast_attention
    assert (cfg.pooled_text_dim, cfg.time_ids_dim) == (1280, 6)


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------


def _text_pair(cfg: CLIPTextConfig, with_projection: bool, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = TorchTextConfig(**cfg.to_hf())
    cls = CLIPTextModelWithProjection if with_projection else TorchTextModel
    ref = perturb_(cls(hf_cfg), seed=seed)
    ours_cfg = CLIPTextConfig.from_hf(hf_cfg.to_dict())
    assert ours_cfg == cfg
    abstract = abstract_module(
        lambda r: CLIPTextModel(ours_cfg, with_projection=with_projection, rngs=r)
    )
    ours = load_into(
        abstract,
        torch_source(ref),
        CLIP_RULES,
        what="CLIP text",
        strip_prefixes=CLIP_TEXT_STRIP_PREFIXES,
        ignore=CLIP_IGNORE,
    )
    return ref, ours


def _prompt_ids(pad: int, lengths=(5, 12), n: int = 77) -> np.ndarray:
    """BOS, random tokens, EOS, then ``pad`` (tokenizer 1 pads with EOS, tokenizer 2 with "!",
    id 0), like the SDXL tokenizers' max_length padding."""
    r = np.random.RandomState(3)
    ids = np.full((len(lengths), n), pad, np.int64)
    for i, k in enumerate(lengths):
        ids[i, 0], ids[i, 1 : k + 1], ids[i, k + 1] = BOS, r.randint(300, 40000, k), EOS
    return ids


@pytest.fixture(scope="module")
def text_towers():
    return _text_pair(TINY_TEXT, False, seed=1), _text_pair(TINY_TEXT_2, True, seed=2)


def test_parity_text_encoder_2(text_towers):
    _, (ref, ours) = text_towers
    ids = _prompt_ids(pad=0)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = apply(ours, jnp.asarray(ids))
    chex.assert_shape(got.hidden_states[-2], (2, 77, TINY_TEXT_2.hidden_size))
    chex.assert_shape(got.text_embeds, (2, TINY_TEXT_2.projection_dim))
    chex.assert_type([got.hidden_states[-2], got.text_embeds], jnp.float32)
    assert len(got.hidden_states) == len(want.hidden_states) == TINY_TEXT_2.num_hidden_layers + 1
    np.testing.assert_allclose(
        np.asarray(got.hidden_states[-2]), want.hidden_states[-2].numpy(), atol=TOL, rtol=0
    )
    np.testing.assert_allclose(
        np.asarray(got.text_embeds), want.text_embeds.numpy(), atol=TOL, rtol=0
    )
    # eos_token_id 2 (legacy): the pooled position is the argmax of the ids, i.e. the EOS
    # before the "!" padding, not the first position that holds id 2 or the pad.
    np.testing.assert_array_equal(np.asarray(ours.eos_index(jnp.asarray(ids))), [6, 13])


def test_encode_sdxl_prompt_matches_transformers(text_towers):
    (ref1, te1), (ref2, te2) = text_towers
    ids1, ids2 = _prompt_ids(pad=EOS), _prompt_ids(pad=0)
    with torch.no_grad():
        out1 = ref1(torch.from_numpy(ids1), output_hidden_states=True)
        out2 = ref2(torch.from_numpy(ids2), output_hidden_states=True)
    want_ctx = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).numpy()
    want_pooled = out2.text_embeds.numpy()

    encode = _jit(
        lambda a, b, i, j, e=None, f=None: encode_sdxl_prompt(
            a, b, i, j, inputs_embeds=e, inputs_embeds_2=f
        )
    )
    ctx, pooled = encode(te1, te2, jnp.asarray(ids1), jnp.asarray(ids2))
    chex.assert_shape(ctx, (2, 77, TINY_SDXL_UNET.cross_attention_dim))
    chex.assert_shape(pooled, (2, TINY_SDXL_UNET.pooled_text_dim))
    np.testing.assert_allclose(np.asarray(ctx), want_ctx, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, atol=TOL, rtol=0)

    # inputs_embeds equal to the token embeddings give the same result.
    e1, e2 = te1.embed_tokens(jnp.asarray(ids1)), te2.embed_tokens(jnp.asarray(ids2))
    ctx_e, pooled_e = encode(te1, te2, jnp.asarray(ids1), jnp.asarray(ids2), e1, e2)
    np.testing.assert_allclose(np.asarray(ctx_e), np.asarray(ctx), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled_e), np.asarray(pooled), atol=1e-6, rtol=0)
    # ... and edited embeddings (a pseudo-word) change both parts of the context.
    ctx_x, _ = encode(
        te1, te2, jnp.asarray(ids1), jnp.asarray(ids2), e1.at[:, 2].add(1.0), e2.at[:, 2].add(1.0)
    )
    diff = np.abs(np.asarray(ctx_x) - np.asarray(ctx))[:, 2:]
    w1 = TINY_TEXT.hidden_size
    assert diff[..., :w1].max() > 1e-2 and diff[..., w1:].max() > 1e-2

    no_proj = abstract_module(lambda r: CLIPTextModel(TINY_TEXT_2, rngs=r))
    with pytest.raises(ValueError, match="projection"):
        encode_sdxl_prompt(te1, no_proj, jnp.asarray(ids1), jnp.asarray(ids2))


@pytest.mark.parametrize(
    "cfg,with_projection,count",
    [(SDXL_TEXT, False, 123_060_480), (SDXL_TEXT_2, True, 694_659_840)],
    ids=["text_encoder", "text_encoder_2"],
)
def test_sdxl_text_structure_matches_transformers(cfg, with_projection, count):
    ours = abstract_module(lambda r: CLIPTextModel(cfg, with_projection=with_projection, rngs=r))
    assert _count(ours) == count
    cls = CLIPTextModelWithProjection if with_projection else TorchTextModel
    with torch.device("meta"):
        ref = cls(TorchTextConfig(**cfg.to_hf()))
    assert sum(p.numel() for p in ref.parameters()) == count
    prefixed = any(k.startswith("text_model.") for k in ref.state_dict())

    def name(key):  # text_projection.weight sits outside text_model.
        return key if not prefixed or key.startswith("text_projection.") else "text_model." + key

    _assert_structure(ours, ref, CLIP_RULES, name, ignore=("position_ids",))


def test_vit_h14_structure_matches_transformers():
    """IP-Adapter SDXL's image encoder (OpenCLIP ViT-H/14 vision tower with its projection)."""
    ours = abstract_module(lambda r: CLIPVisionModel(VIT_H14_VISION, with_projection=True, rngs=r))
    with torch.device("meta"):
        ref = CLIPVisionModelWithProjection(TorchVisionConfig(**VIT_H14_VISION.to_hf()))
    assert _count(ours) == sum(p.numel() for p in ref.parameters()) == 632_076_800

    def name(key):
        return key if key.startswith("visual_projection.") else "vision_model." + key

    _assert_structure(ours, ref, CLIP_RULES, name, ignore=("position_ids",))


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_pair():
    torch.manual_seed(0)
    ref = perturb_(TorchVAE(**_diffusers_kwargs(TINY_SDXL_VAE)))
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    assert cfg == TINY_SDXL_VAE
    ours = load_into(
        abstract_module(lambda r: AutoencoderKL(cfg, rngs=r)), torch_source(ref), what="VAE"
    )
    return ref, ours


def _decode(m, z):
    return m.decode(m.unscale_latents(z))


def test_parity_sdxl_vae_decode(vae_pair):
    ref, ours = vae_pair
    # Diffusion-space latents; the pipeline divides by scaling_factor (0.13025) before decode.
    z = (np.random.RandomState(0).randn(2, 4, 16, 16) * 0.13025).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z) / ref.config.scaling_factor).sample.numpy()
    got = _jit(_decode)(ours, jnp.asarray(to_nhwc(z)))
    chex.assert_shape(got, (2, 32, 32, 3))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(to_nchw(got), want, atol=TOL, rtol=0)
    assert ours.config.scaling_factor == 0.13025


def test_sdxl_vae_config_from_diffusers():
    cfg = VAEConfig.from_diffusers(SDXL_VAE_JSON)
    assert cfg == SDXL_VAE
    assert cfg.force_upcast is True and cfg.scaling_factor == 0.13025
    off = VAEConfig.from_diffusers(dict(SDXL_VAE_JSON, force_upcast=False, scaling_factor=0.2))
    assert off.force_upcast is False and off.scaling_factor == 0.2
    # diffusers accepts our config back and keeps both fields.
    with torch.device("meta"):
        ref = TorchVAE(**_diffusers_kwargs(SDXL_VAE, force_upcast=False))
    assert ref.config.force_upcast is False and ref.config.scaling_factor == 0.13025
    assert VAEConfig.from_diffusers(dict(ref.config)) == dataclasses.replace(
        SDXL_VAE, force_upcast=False
    )


def _compute_dtypes(module) -> set:
    """The compute dtypes of every layer (convs, linears, norms) in ``module``."""
    return {
        jnp.dtype(m.dtype)
        for _, m in nnx.iter_graph(module)
        if isinstance(m, nnx.Module) and getattr(m, "dtype", None) is not None
    }


@pytest.mark.parametrize(
    "dtype,force_upcast,upcast,want",
    [
        (jnp.float16, True, None, jnp.float32),  # diffusers' rule: fp16 is upcast
        (jnp.float16, False, None, jnp.float16),
        (jnp.bfloat16, True, None, jnp.bfloat16),  # bf16 has fp32's range: kept
        (jnp.float32, True, None, jnp.float32),
        (jnp.bfloat16, True, True, jnp.float32),  # explicit
        (jnp.float16, True, False, jnp.float16),
    ],
)
def test_sdxl_vae_upcast(vae_pair, dtype, force_upcast, upcast, want):
    ref, ours32 = vae_pair
    cfg = dataclasses.replace(TINY_SDXL_VAE, force_upcast=force_upcast)
    m = load_into(
        abstract_module(lambda r: AutoencoderKL(cfg, dtype=dtype, upcast=upcast, rngs=r)),
        torch_source(ref),
        what="VAE",
    )
    assert jnp.dtype(m.dtype) == want
    assert _compute_dtypes(m) == {jnp.dtype(want)}
    if want == jnp.float32:
        z = jnp.asarray(np.random.RandomState(0).randn(1, 16, 16, 4) * 0.13025, jnp.float32)
        got = _jit(_decode)(m, z)
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(_jit(_decode)(ours32, z)), atol=1e-5, rtol=0
        )


def test_sdxl_vae_structure_matches_diffusers():
    ours = abstract_module(lambda r: AutoencoderKL(SDXL_VAE, rngs=r))
    with torch.device("meta"):
        ref = TorchVAE(**_diffusers_kwargs(SDXL_VAE))
    assert _count(ours) == sum(p.numel() for p in ref.parameters()) == 83_653_863
    _assert_structure(ours, ref, DEFAULT_RULES)


# ---------------------------------------------------------------------------------------------
# Time ids
# ---------------------------------------------------------------------------------------------


def test_sdxl_time_ids():
    one = sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024))
    chex.assert_shape(one, (1, 6))
    chex.assert_type(one, np.float32)
    np.testing.assert_array_equal(one, [[1024, 1024, 0, 0, 1024, 1024]])
    # diffusers' _get_add_time_ids order: original (h, w) + crop (top, left) + target (h, w).
    three = sdxl_time_ids((768, 512), (16, 32), (1024, 896), batch=3)
    chex.assert_shape(three, (3, 6))
    np.testing.assert_array_equal(three, [[768, 512, 16, 32, 1024, 896]] * 3)
    # Per-sample pairs, broadcast with single ones (and with a batch that agrees).
    per = sdxl_time_ids([[1024, 1024], [512, 768]], (0, 0), np.array([[1024, 1024]]))
    np.testing.assert_array_equal(
        per, [[1024, 1024, 0, 0, 1024, 1024], [512, 768, 0, 0] + [1024] * 2]
    )
    np.testing.assert_array_equal(
        sdxl_time_ids([[1024, 1024], [512, 768]], (0, 0), (1024, 1024), batch=2), per
    )


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (((1024,), (0, 0), (1024, 1024)), {}, "original_size"),
        (((1024, 1024), (0, 0, 0), (1024, 1024)), {}, "crop_top_left"),
        (((1024, 1024), (0, 0), np.zeros((2, 2, 2))), {}, "target_size"),
        (((1024, 1024), np.zeros((2, 2)), np.zeros((3, 2))), {}, "rows"),
        ((np.zeros((2, 2)), (0, 0), (1024, 1024)), {"batch": 3}, "batch"),
    ],
    ids=["short-pair", "long-pair", "3-d", "rows-disagree", "batch-disagrees"],
)
def test_sdxl_time_ids_bad_shapes(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdxl_time_ids(*args, **kwargs)
