"""dlib's face-recognition ResNet (``anet_type``, 5.6 M weights) as a Flax NNX module, NHWC.

Input: RGB face chips, (N, 150, 150, 3) float pixel values in 0..255, cut the way
``dlib.get_face_chip`` cuts them (:mod:`pv_jax.face.align`). Output: (N, 128) descriptors, not
normalised; dlib calls two faces the same person when their Euclidean distance is below 0.6.
Every detail follows dlib's CPU code (``dlib/dnn/layers.h``, ``dlib/cuda/cpu_dlib.cpp``), since each
one moves the descriptor by more than the float32 noise: (pixel - mean) / 256; padding only for
stride-1 convolutions; floor output sizes; residual sums zero-padded to the larger operand.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from pv_jax.face.dlib_format import (
    DESCRIPTOR_DIM,
    FACE_RESNET_STAGES,
    STEM_CHANNELS,
    read_face_resnet,
)
from pv_jax.models.layers import abstract_module
from pv_jax.weights.convert import Rule, load_into

# dlib's input_rgb_image_sized means (R, G, B), as stored (float32) in the weights file.
DLIB_INPUT_MEAN = (122.78199768066406, 117.0009994506836, 104.2979965209961)

# The reader names tensors by module path; only conv kernels change layout (OIHW -> HWIO).
FACE_RESNET_RULES: tuple[Rule, ...] = (
    Rule(r"^fc\.kernel$", "fc.kernel"),
    Rule(r"^(.+)\.kernel$", r"\1.weight", "auto"),
    Rule(r"^(.+)$", r"\1"),
)

Precision = jax.lax.Precision | str | None


def _conv(
    cin: int, cout: int, k: int, stride: int, precision: Precision, rngs: nnx.Rngs
) -> nnx.Conv:
    # dlib pads by k // 2 only when the stride is 1 (con_'s default template arguments).
    p = k // 2 if stride == 1 else 0
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=((p, p), (p, p)),
        precision=precision,
        rngs=rngs,
    )


class Affine(nnx.Module):
    """Per-channel ``x * scale + bias`` (dlib's ``affine`` layer: batch norm folded in)."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., C)."""
        return x * self.scale.get_value() + self.bias.get_value()


def add_prev(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add_prev: the sum has the larger shape, each operand sits at the top-left/first
    channels and missing positions count as zero (cpu_dlib.cpp ``add(dest, src1, src2)``)."""
    shape = tuple(max(i, j) for i, j in zip(a.shape, b.shape, strict=True))

    def pad(x: jax.Array) -> jax.Array:
        return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])

    return pad(a) + pad(b)


def _pool(x: jax.Array, size: int, stride: int, op: str) -> jax.Array:
    """Unpadded NHWC pooling with floor output sizes (dlib pools never pad here)."""
    window, strides = (1, size, size, 1), (1, stride, stride, 1)
    if op == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, "VALID")
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, "VALID") / (size * size)


class ResidualBlock(nnx.Module):
    """``ares`` / ``ares_down``: relu(affine(conv(relu(affine(conv(x))))) + shortcut(x)).

    The shortcut is the identity, or a 2x2/2 average pool when the block downsamples; channel
    and size mismatches of the sum are resolved by :func:`add_prev`.
    """

    def __init__(
        self, cin: int, cout: int, downsample: bool, *, precision: Precision, rngs: nnx.Rngs
    ):
        self.downsample = downsample
        self.conv1 = _conv(cin, cout, 3, 2 if downsample else 1, precision, rngs)
        self.affine1 = Affine(cout)
        self.conv2 = _conv(cout, cout, 3, 1, precision, rngs)
        self.affine2 = Affine(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, H, W, C_in) -> (N, H', W', C_out)."""
        y = self.affine2(self.conv2(jax.nn.relu(self.affine1(self.conv1(x)))))
        shortcut = _pool(x, 2, 2, "avg") if self.downsample else x
        return jax.nn.relu(add_prev(y, shortcut))


class Stem(nnx.Module):
    """7x7/2 convolution, affine, relu, 3x3/2 max pool (150 -> 72 -> 35)."""

    def __init__(self, *, precision: Precision, rngs: nnx.Rngs):
        self.conv = _conv(3, STEM_CHANNELS, 7, 2, precision, rngs)
        self.affine = Affine(STEM_CHANNELS)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (N, 150, 150, 3) normalised -> (N, 35, 35, 32)."""
        return _pool(jax.nn.relu(self.affine(self.conv(x))), 3, 2, "max")


class FaceResNet(nnx.Module):
    """dlib's face-recognition ResNet: (N, 150, 150, 3) RGB 0..255 -> (N, 128) descriptors.

    ``precision`` applies to every convolution and the final matmul; the default (HIGHEST)
    keeps float32 parity with dlib on accelerators whose default matmuls round to bf16/tf32.
    """

    def __init__(
        self,
        *,
        input_mean: tuple[float, float, float] = DLIB_INPUT_MEAN,
        precision: Precision = jax.lax.Precision.HIGHEST,
        rngs: nnx.Rngs,
    ):
        self.input_mean = tuple(float(m) for m in input_mean)
        self.stem = Stem(precision=precision, rngs=rngs)
        blocks, cin = [], STEM_CHANNELS
        for channels, count, downsample in FACE_RESNET_STAGES:
            for i in range(count):
                blocks.append(
                    ResidualBlock(
                        cin, channels, downsample and i == 0, precision=precision, rngs=rngs
                    )
                )
                cin = channels
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(cin, DESCRIPTOR_DIM, use_bias=False, precision=precision, rngs=rngs)

    def __call__(self, chips: jax.Array) -> jax.Array:
        """chips: (N, H, W, 3) RGB pixel values 0..255 (H = W = 150) -> (N, 128) float32."""
        mean = jnp.asarray(self.input_mean, jnp.float32)
        # dlib: (pixel - mean) / 256 (not / 255), RGB order.
        x = (chips.astype(jnp.float32) - mean) / 256.0
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


def load_dlib_face_net(
    path: str | os.PathLike | None = None,
    *,
    precision: Precision = jax.lax.Precision.HIGHEST,
) -> FaceResNet:
    """Build :class:`FaceResNet` from dlib's weights file (default: face_recognition_models')."""
    weights = read_face_resnet(path)
    abstract = abstract_module(
        lambda r: FaceResNet(input_mean=weights.input_mean, precision=precision, rngs=r)
    )
    source = {k: (lambda v=v: v) for k, v in weights.tensors.items()}
    return load_into(abstract, source, FACE_RESNET_RULES, what=f"dlib face ResNet ({weights.path})")
