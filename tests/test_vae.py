"""AutoencoderKL: encode/decode parity with diffusers (PyTorch) on a tiny config."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_VAE, perturb_, to_nchw, to_nhwc, torch_source
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

from pv_jax.models.layers import abstract_module
from pv_jax.models.vae import AutoencoderKL, VAEConfig
from pv_jax.weights.convert import load_into

# Achieved fp32 max-abs error vs diffusers: mean 3.3e-6, logvar 3.8e-6, decode 8.9e-6 (|x| ~ 3).
TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = perturb_(TorchVAE(**TINY_VAE))
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    ours = load_into(
        abstract_module(lambda r: AutoencoderKL(cfg, rngs=r)), torch_source(ref), what="VAE"
    )
    return ref, ours


def test_parity_vae_encode_decode(pair):
    ref, ours = pair
    x = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
        want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
        want_img = ref.decode(dist.mean).sample.numpy()
    mean, logvar = jax.jit(lambda m, x: m.encode(x))(ours, jnp.asarray(to_nhwc(x)))
    chex.assert_shape([mean, logvar], (2, 16, 16, 4))
    img = jax.jit(lambda m, z: m.decode(z))(ours, mean)
    chex.assert_shape(img, (2, 32, 32, 3))
    np.testing.assert_allclose(to_nchw(mean), want_mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(to_nchw(logvar), want_logvar, atol=TOL, rtol=0)
    np.testing.assert_allclose(to_nchw(img), want_img, atol=TOL, rtol=0)


def test_vae_decode_remat_same_value_and_grad(pair):
    """A loss on decoded images (the face loss's path): the remat decoder gives the same value
    and gradient, to the latents and to the decoder's weights."""
    _, ours = pair
    remat = nnx.clone(ours)
    remat.remat = True
    z = jnp.asarray(np.random.RandomState(3).randn(2, 16, 16, 4), jnp.float32)

    def loss(m, z):
        return jnp.mean(m.decode_images(z) ** 2)

    # The remat decoder's blocks are custom-VJP calls (pv_jax.models.remat); the plain one has none.
    calls = [str(jax.make_jaxpr(loss)(m, z)).count("custom_vjp_call") for m in (ours, remat)]
    assert calls[0] == 0 and calls[1] >= 4, calls
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    (va, (ma, za)), (vb, (mb, zb)) = grad(ours, z), grad(remat, z)
    np.testing.assert_allclose(float(vb), float(va), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(zb), np.asarray(za), rtol=1e-5, atol=1e-9)
    for a, b in zip(jax.tree.leaves(nnx.state(mb)), jax.tree.leaves(nnx.state(ma)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)


def test_vae_latent_scaling_round_trips(pair):
    _, ours = pair
    z = jnp.asarray(np.random.RandomState(2).randn(1, 4, 4, 4), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(ours.unscale_latents(ours.scale_latents(z))), np.asarray(z), atol=1e-6
    )
    assert ours.config.scaling_factor == TINY_VAE.get("scaling_factor", 0.18215)


def test_vae_sample_latents_uses_posterior(pair):
    _, ours = pair
    x = jnp.asarray(np.random.RandomState(0).randn(1, 32, 32, 3), jnp.float32)
    a = ours.sample_latents(x, jax.random.key(0))
    b = ours.sample_latents(x, jax.random.key(1))
    mean, _ = ours.encode(x)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # Two draws average closer to the scaled mean than either draw alone.
    target = np.asarray(ours.scale_latents(mean))
    err_avg = np.abs((np.asarray(a) + np.asarray(b)) / 2 - target).mean()
    assert err_avg < np.abs(np.asarray(a) - target).mean()


def test_vae_unsupported_config():
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers(dict(TINY_VAE, latents_mean=[0.0] * 4))
