"""Layer factories shared by every network: NHWC convolutions, linears and norms.

Every network names its submodules exactly as the PyTorch reference names them
(``down_blocks.0.resnets.1.conv1``), so that weight import is a short table of rules
(``pv_jax.weights.convert``) and never a hand-written key map per network.

Parameters carry *logical* axis names (``embed``, ``heads``, ``mlp``, ``conv_in``, ...) through
``nnx.with_partitioning(..., eager_sharding=False)``: nothing is placed on a mesh at build time;
the training code maps the names onto mesh axes with one rule table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type

# Logical axis names used across the package (the training issue maps them onto mesh axes).
EMBED = "embed"  # model width of a linear's input
MLP = "mlp"  # model width of a linear's output (hidden, ffn)
HEADS = "heads"  # attention heads x head dim
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
VOCAB = "vocab"
NORM = "norm"


def _partitioned(init: nnx.Initializer, axes: Sequence[str | None]) -> nnx.Initializer:
    """Attach logical axis names to an initialiser without sharding eagerly."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


# Below this many output pixels per image, "auto" runs a KxK convolution on the CPU as one
# matmul over gathered patches (im2col): XLA's CPU convolution reaches only 20-45 GFLOP/s on
# SD's 8x8 and 4x4 feature maps with 1280 channels, im2col 100-120 (bench/unet.py).
IM2COL_MAX_PIXELS = 1024


class Conv2d(nnx.Module):
    """A 2-D NHWC convolution (kernel HWIO) with a choice of CPU-friendly implementations.

    ``impl``: ``"xla"`` (``lax.conv_general_dilated``), ``"im2col"`` (patches @ kernel), or
    ``"auto"`` (im2col on the CPU for small feature maps, XLA otherwise). 1x1 convolutions are
    always a plain matmul.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
        use_bias: bool = True,
        impl: str = "auto",
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if impl not in ("auto", "xla", "im2col"):
            raise ValueError(f"unknown conv impl {impl!r}; choose auto, xla or im2col")
        k_init = _partitioned(nnx.initializers.lecun_normal(), (None, None, CONV_IN, CONV_OUT))
        self.kernel = nnx.Param(k_init(rngs.params(), (kernel, kernel, in_ch, out_ch)))
        b_init = _partitioned(nnx.initializers.zeros_init(), (CONV_OUT,))
        self.bias = nnx.Param(b_init(rngs.params(), (out_ch,))) if use_bias else None
        self.stride = stride
        self.padding = tuple(tuple(p) for p in padding)
        self.impl = impl
        self.dtype = dtype

    def _use_im2col(self, out_pixels: int) -> bool:
        if self.impl == "auto":
            return jax.default_backend() == "cpu" and out_pixels < IM2COL_MAX_PIXELS
        return self.impl == "im2col"

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C_in) -> (B, H', W', C_out)."""
        w = self.kernel.get_value().astype(self.dtype)
        x = x.astype(self.dtype)
        kh, kw, cin, cout = w.shape
        s = self.stride
        (pt, pb), (pl, pr) = self.padding
        b, h, wd, _ = x.shape
        ho, wo = (h + pt + pb - kh) // s + 1, (wd + pl + pr - kw) // s + 1
        if kh == kw == 1 and s == 1 and not any(sum(self.padding, ())):
            y = x @ w[0, 0]
        elif self._use_im2col(ho * wo):
            xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            cols = [
                xp[:, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s, :]
                for dy in range(kh)
                for dx in range(kw)
            ]
            y = jnp.concatenate(cols, axis=-1) @ w.reshape(kh * kw * cin, cout)
        else:
            y = jax.lax.conv_general_dilated(
                x, w, (s, s), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] | None = None,
    use_bias: bool = True,
    impl: str = "auto",
    dtype: Dtype = jnp.float32,
) -> Conv2d:
    """A 2-D NHWC convolution with torch's default 'same-size for stride 1' padding."""
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=tuple(padding),
        use_bias=use_bias,
        impl=impl,
        dtype=dtype,
        rngs=rngs,
    )


def linear(
    in_f: int,
    out_f: int,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    axes: tuple[str | None, str | None] = (EMBED, MLP),
    dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """A dense layer whose kernel is (in, out) with logical axes ``axes``."""
    return nnx.Linear(
        in_f,
        out_f,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_partitioned(nnx.initializers.lecun_normal(), axes),
        bias_init=_partitioned(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs,
    )


def group_norm(
    channels: int, groups: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32
) -> nnx.GroupNorm:
    """GroupNorm with torch semantics (two-pass variance for fp32 parity)."""
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_partitioned(nnx.initializers.ones_init(), (NORM,)),
        bias_init=_partitioned(nnx.initializers.zeros_init(), (NORM,)),
        rngs=rngs,
    )


def layer_norm(
    features: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32
) -> nnx.LayerNorm:
    """LayerNorm with torch semantics (two-pass variance for fp32 parity)."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_partitioned(nnx.initializers.ones_init(), (NORM,)),
        bias_init=_partitioned(nnx.initializers.zeros_init(), (NORM,)),
        rngs=rngs,
    )


def embed(num: int, features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32) -> nnx.Embed:
    """A lookup table (vocab or positions) of shape (num, features)."""
    return nnx.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=_partitioned(nnx.initializers.normal(0.02), (VOCAB, EMBED)),
        rngs=rngs,
    )


def param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float = 0.02
) -> nnx.Param:
    """A free-standing parameter (e.g. CLIP's class embedding) with logical axes."""
    init = _partitioned(nnx.initializers.normal(std), axes)
    return nnx.Param(init(rngs.params(), shape, jnp.float32))


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function called ``name`` in a diffusers/transformers config."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


class _ConstantKeyStream:
    """An RNG stream that returns one fixed key and keeps no counter."""

    def __init__(self, key: jax.Array):
        self.key = key

    def __call__(self) -> jax.Array:
        return self.key


class ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` when a module is built only for its shapes.

    Every stream (``rngs.params()``, ``rngs()``) returns the same key and updates nothing.
    ``nnx.Rngs`` increments a counter variable per draw, and under tracing flax 0.12 compares the
    new counter's sharding with the old one on every update, which makes jax describe the
    tracer's origin by walking the whole trace so far: building grows quadratically with the
    number of parameters (SDXL's UNet: 208 s, against 2 s with this).
    """

    def __init__(self, seed: int = 0):
        self._key = jax.random.key(seed)

    def __getattr__(self, name: str) -> _ConstantKeyStream:
        if name.startswith("_"):
            raise AttributeError(name)
        return _ConstantKeyStream(self._key)

    def __call__(self) -> jax.Array:
        return self._key


def abstract_module(ctor: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``ctor(rngs)`` built abstractly (``nnx.eval_shape``): shapes, dtypes and metadata, no
    values; fill it from weights (``pv_jax.weights``) or numpy (``presets.random_module``)."""
    return nnx.eval_shape(lambda: ctor(ShapeOnlyRngs()))
