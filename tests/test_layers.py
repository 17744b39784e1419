"""Layer factories: every convolution implementation equals torch's conv2d."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from pv_jax.models import layers

# Achieved fp32 max-abs error vs torch.nn.functional.conv2d: ~5e-6 on O(10) outputs.
TOL = 1e-4


@pytest.mark.parametrize("impl", ["xla", "im2col", "auto"])
@pytest.mark.parametrize(
    "kernel,stride,padding",
    [(3, 1, 1), (3, 2, 1), (3, 2, ((0, 1), (0, 1))), (1, 1, 0), (4, 4, 0), (7, 2, 3)],
)
def test_parity_conv_impls(impl, kernel, stride, padding):
    conv = layers.conv(6, 5, kernel, stride=stride, padding=padding, impl=impl, rngs=nnx.Rngs(0))
    x = np.random.RandomState(0).randn(2, 13, 12, 6).astype(np.float32)
    got = jax.jit(lambda m, x: m(x))(conv, x)
    w = torch.from_numpy(np.asarray(conv.kernel.get_value()).transpose(3, 2, 0, 1).copy())
    b = torch.from_numpy(np.asarray(conv.bias.get_value()))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    if isinstance(padding, int):
        want = torch.nn.functional.conv2d(xt, w, b, stride=stride, padding=padding)
    else:  # asymmetric: pad (left, right, top, bottom) explicitly, as diffusers' VAE does
        xt = torch.nn.functional.pad(xt, (0, 1, 0, 1))
        want = torch.nn.functional.conv2d(xt, w, b, stride=stride)
    np.testing.assert_allclose(
        np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=TOL, rtol=0
    )


def test_unknown_conv_impl_and_activation():
    with pytest.raises(ValueError, match="im2col"):
        layers.conv(2, 2, 3, impl="winograd", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quick_gelu"):
        layers.activation("mish")
