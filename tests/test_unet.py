"""UNet2DConditionModel: parity with diffusers on tiny SD1/SD2 configs; SD1.5 structure."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_UNET_SD1, TINY_UNET_SD2, apply, perturb_, to_nchw, to_nhwc, torch_source
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from pv_jax.models.layers import abstract_module
from pv_jax.models.presets import random_module
from pv_jax.models.unet import UNet2DConditionModel, UNetConfig
from pv_jax.weights.convert import (
    DEFAULT_RULES,
    WeightImportError,
    load_into,
    to_torch_layout,
    torch_key,
)

# Achieved fp32 max-abs error vs diffusers: 3.8e-6 (SD1-style), 6.4e-6 (SD2-style); outputs ~O(2).
TOL = 1e-4


def _pair(cfg: dict, seed: int = 0, **kwargs) -> tuple[TorchUNet, UNet2DConditionModel]:
    torch.manual_seed(seed)
    ref = perturb_(TorchUNet(**cfg), seed=seed)
    ours_cfg = UNetConfig.from_diffusers(dict(ref.config))
    abstract = abstract_module(lambda r: UNet2DConditionModel(ours_cfg, rngs=r, **kwargs))
    return ref, load_into(abstract, torch_source(ref), what="UNet")


def _inputs(cfg: dict, batch: int = 2):
    r = np.random.RandomState(1)
    s = cfg["sample_size"]
    x = r.randn(batch, cfg["in_channels"], s, s).astype(np.float32)
    ctx = r.randn(batch, 7, cfg["cross_attention_dim"]).astype(np.float32)
    t = np.array([10, 900][:batch], dtype=np.int64)
    return x, t, ctx


def _torch_out(ref: TorchUNet, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


@pytest.mark.parametrize("cfg", [TINY_UNET_SD1, TINY_UNET_SD2], ids=["sd1", "sd2"])
@pytest.mark.parametrize("attention", ["dot", "blocked"])
def test_parity_unet(cfg, attention):
    ref, ours = _pair(cfg, attention=attention)
    x, t, ctx = _inputs(cfg)
    want = _torch_out(ref, x, t, ctx)
    got = apply(ours, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx))
    chex.assert_shape(got, (2, cfg["sample_size"], cfg["sample_size"], cfg["out_channels"]))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(to_nchw(got), want, atol=TOL, rtol=0)


def test_unet_scalar_timestep_broadcasts():
    _, ours = _pair(TINY_UNET_SD1)
    x, _, ctx = _inputs(TINY_UNET_SD1)
    a = apply(ours, jnp.asarray(to_nhwc(x)), jnp.asarray(500), jnp.asarray(ctx))
    b = apply(ours, jnp.asarray(to_nhwc(x)), jnp.array([500, 500]), jnp.asarray(ctx))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unet_bf16_close_to_fp32():
    ref, ours32 = _pair(TINY_UNET_SD1)
    abstract = abstract_module(
        lambda r: UNet2DConditionModel(
            UNetConfig.from_diffusers(dict(ref.config)), dtype=jnp.bfloat16, rngs=r
        )
    )
    ours16 = load_into(abstract, torch_source(ref), what="UNet")
    x, t, ctx = _inputs(TINY_UNET_SD1)
    a = np.asarray(apply(ours32, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx)))
    b = apply(ours16, jnp.asarray(to_nhwc(x)), t, jnp.asarray(ctx))
    chex.assert_type(b, jnp.float32)  # outputs are returned in fp32 whatever the compute dtype
    # Params stay fp32 (master weights); compute is bf16.
    chex.assert_type(ours16.conv_in.kernel.get_value(), jnp.float32)
    rel = np.abs(np.asarray(b) - a).max() / np.abs(a).max()
    assert np.isfinite(np.asarray(b)).all() and rel < 5e-2, rel


def test_unet_remat_same_value_and_grad():
    # One level of one resnet and one transformer layer per block: remat's wiring (per resnet and
    # per transformer layer, down, mid and up), at a third of the two-level UNet's compile.
    cfg = dict(
        TINY_UNET_SD1,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
    )
    _, plain = _pair(cfg)
    _, remat = _pair(cfg, remat=True)
    x, t, ctx = _inputs(cfg)
    x, ctx = jnp.asarray(to_nhwc(x)), jnp.asarray(ctx)

    def loss(m, ctx):
        return jnp.mean(m(x, t, ctx) ** 2)

    # Each of the 5 resnets and 4 transformer layers is a custom-VJP call (pv_jax.models.remat).
    calls = [str(jax.make_jaxpr(loss)(m, ctx)).count("custom_vjp_call") for m in (plain, remat)]
    assert calls == [0, 5 + 4], calls
    va, ga = jax.jit(jax.value_and_grad(loss, argnums=1))(plain, ctx)
    vb, gb = jax.jit(jax.value_and_grad(loss, argnums=1))(remat, ctx)
    np.testing.assert_allclose(float(va), float(vb), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-6)


def test_cross_attention_kwargs_reach_every_cross_attention():
    """The hook the PhotoVerse conditioning uses: a custom cross-attention class and kwargs."""
    from pv_jax.models.blocks import Attention

    seen = []

    class Scaled(Attention):
        def __call__(self, x, context=None, *, scale=1.0):
            seen.append(type(self).__name__)  # recorded at trace time
            return super().__call__(x, context) * scale

    cfg = UNetConfig.from_diffusers(TINY_UNET_SD1)
    m = random_module(
        lambda r: UNet2DConditionModel(cfg, cross_attention_cls=Scaled, rngs=r),
        np.random.default_rng(0),
    )
    x, t, ctx = _inputs(TINY_UNET_SD1)
    x, ctx = jnp.asarray(to_nhwc(x)), jnp.asarray(ctx)
    half = apply(m, x, t, ctx, cross_attention_kwargs={"scale": 0.5})
    # SD1 tiny: 2 down attentions + 1 mid + 3 up attentions.
    assert seen == ["Scaled"] * 6
    full = apply(m, x, t, ctx, cross_attention_kwargs={"scale": 1.0})
    assert np.abs(np.asarray(half) - np.asarray(full)).max() > 1e-4


def test_unet_params_carry_logical_axes():
    cfg = UNetConfig.from_diffusers(TINY_UNET_SD1)
    abstract = abstract_module(lambda r: UNet2DConditionModel(cfg, rngs=r))
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    flat = dict(nnx.to_flat_state(specs))
    assert tuple(flat[("conv_in", "kernel")].get_value()) == (None, None, "conv_in", "conv_out")
    q = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q", "kernel")
    assert tuple(flat[q].get_value()) == ("embed", "heads")
    for path, spec in flat.items():
        assert len(spec.get_value()) in (0, len(path) and 1, 2, 4), path


def test_sd15_structure_matches_diffusers():
    """The full SD1.5 UNet, built abstractly: diffusers' parameter count and every shape."""
    cfg = UNetConfig()  # defaults are SD 1.5
    abstract = abstract_module(lambda r: UNet2DConditionModel(cfg, rngs=r))
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    total = sum(int(np.prod(v.get_value().shape)) for _, v in params)
    assert total == 859_520_964
    with torch.device("meta"):
        ref = TorchUNet(**cfg.to_diffusers())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {}
    for path, v in params:
        key, layout = torch_key(".".join(map(str, path)), DEFAULT_RULES)
        shape = v.get_value().shape
        got[key] = to_torch_layout(np.empty(shape, np.bool_), layout).shape
    assert got == want


def test_import_errors_list_keys():
    ref, _ = _pair(TINY_UNET_SD1)
    cfg = UNetConfig.from_diffusers(dict(ref.config))
    abstract = lambda: abstract_module(lambda r: UNet2DConditionModel(cfg, rngs=r))
    src = torch_source(ref)
    missing = dict(src)
    del missing["conv_in.weight"]
    missing["extra.weight"] = lambda: np.zeros(3)
    with pytest.raises(WeightImportError) as e:
        load_into(abstract(), missing, what="UNet")
    msg = str(e.value)
    assert "missing keys (1)" in msg and "conv_in.weight" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    wrong = dict(src, **{"conv_out.bias": lambda: np.zeros(5, np.float32)})
    with pytest.raises(WeightImportError, match=r"conv_out.bias: file \(5,\)"):
        load_into(abstract(), wrong, what="UNet")


def test_unsupported_config_is_an_error():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(TINY_UNET_SD1, class_embed_type="timestep"))
