"""Table-driven conversion between PyTorch state dicts and NNX state, shared by every network.

A network's NNX attribute path (``down_blocks.0.resnets.1.conv1.kernel``) is turned into the
PyTorch key (``down_blocks.0.resnets.1.conv1.weight``) by the first matching :class:`Rule`, which
also names the layout change. Import fills an *abstract* module (built with ``nnx.eval_shape``)
tensor by tensor, so loading never holds more than the weights plus one tensor in transit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx


class WeightImportError(ValueError):
    """Weights that do not fit the network: lists every missing, unexpected or mis-shaped key."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Map NNX paths matching ``pattern`` to the torch key ``repl`` with a layout change.

    ``layout``: ``"auto"`` (by rank: 2-D linear kernels are transposed, 4-D conv kernels go
    OIHW <-> HWIO), or ``"none"``.
    """

    pattern: str
    repl: str
    layout: str = "none"

    def __post_init__(self):
        if self.layout not in ("auto", "none"):
            raise ValueError(f"unknown layout {self.layout!r}")


# The rules that cover flax's standard layers; networks prepend their own special cases.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(r"^(.+)\.kernel$", r"\1.weight", "auto"),
    Rule(r"^(.+)\.scale$", r"\1.weight"),
    Rule(r"^(.+)\.embedding$", r"\1.weight"),
    Rule(r"^(.+)$", r"\1"),
)

# CLIP (pv_jax.models.clip): the NNX names mirror transformers', so the default rules cover every
# tensor. transformers 5 saves ``CLIPTextModel`` / ``CLIPVisionModel`` without a prefix, Stable
# Diffusion folders (saved by transformers 4) and the ``*WithProjection`` classes with
# ``text_model.`` / ``vision_model.``.
CLIP_RULES: tuple[Rule, ...] = DEFAULT_RULES
CLIP_TEXT_STRIP_PREFIXES = ("text_model.",)
CLIP_VISION_STRIP_PREFIXES = ("vision_model.",)
CLIP_IGNORE = (r"position_ids$",)  # non-persistent buffer that old checkpoints still carry

# The filter that matches no variable (the default of ``skip``).
nothing: nnx.filterlib.Filter = False

# A lazily read tensor source: key -> function returning the numpy array.
TensorSource = Mapping[str, Callable[[], np.ndarray]]


def torch_key(path: str, rules: Sequence[Rule]) -> tuple[str, str]:
    """The torch key and layout for an NNX path string."""
    for rule in rules:
        if re.match(rule.pattern, path):
            return re.sub(rule.pattern, rule.repl, path), rule.layout
    raise KeyError(f"no conversion rule matches {path!r}")


def to_flax_layout(x: np.ndarray, layout: str, target_ndim: int) -> np.ndarray:
    """Torch layout -> flax layout."""
    if layout == "auto":
        if x.ndim == 4 and target_ndim == 2 and x.shape[2:] == (1, 1):
            x = x[:, :, 0, 0]  # 1x1 conv stored where a linear is expected (old VAE attention)
        if x.ndim == 2:
            return x.T
        if x.ndim == 4:
            return x.transpose(2, 3, 1, 0)
    return x


def to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Flax layout -> torch layout."""
    if layout == "auto":
        if x.ndim == 2:
            return x.T
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
    return x


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _format_keys(title: str, keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n    {shown}{more}"


def normalise_keys(keys: Iterable[str], strip_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """Map normalised key -> source key, stripping optional prefixes (``text_model.`` ...)."""
    out: dict[str, str] = {}
    for key in keys:
        norm = key
        for prefix in strip_prefixes:
            if norm.startswith(prefix):
                norm = norm[len(prefix) :]
                break
        if norm in out:
            raise WeightImportError(f"keys {out[norm]!r} and {key!r} both map to {norm!r}")
        out[norm] = key
    return out


def load_into(
    module: nnx.Module,
    source: TensorSource,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    what: str,
    strip_prefixes: Sequence[str] = (),
    ignore: Sequence[str] = (),
    skip: nnx.filterlib.Filter = nothing,
    param_dtype: jnp.dtype = jnp.float32,
) -> nnx.Module:
    """Fill ``module`` (abstract or concrete) from ``source``; returns the filled module.

    Every NNX variable must find its tensor with the right shape and every source tensor must be
    used (``ignore`` lists regexes of buffers to skip); otherwise a :class:`WeightImportError`
    lists all offending keys at once. Variables matching the NNX filter ``skip`` (parameters the
    file cannot have, e.g. PhotoVerse's LoRA) are left as they are, abstract or not.
    """
    graphdef, state = nnx.split(module)
    skipped = nnx.filterlib.to_predicate(skip)
    by_key = normalise_keys(source.keys(), strip_prefixes)
    missing, mismatched, used = [], [], set()
    for path, var in nnx.to_flat_state(state):
        if skipped(path, var):
            continue
        key, layout = torch_key(_path_str(path), rules)
        if key not in by_key:
            missing.append(key)
            continue
        used.add(key)
        want = tuple(var.get_value().shape)
        array = to_flax_layout(np.asarray(source[by_key[key]]()), layout, len(want))
        if tuple(array.shape) != want:
            mismatched.append(f"{key}: file {tuple(array.shape)} (flax layout), model {want}")
            continue
        var.set_value(jnp.asarray(array, dtype=param_dtype))
        del array
    unexpected = [
        by_key[k] for k in by_key if k not in used and not any(re.search(p, k) for p in ignore)
    ]
    if missing or unexpected or mismatched:
        parts = [f"weights do not fit the {what}:"]
        if missing:
            parts.append(_format_keys("missing keys", missing))
        if unexpected:
            parts.append(_format_keys("unexpected keys", unexpected))
        if mismatched:
            parts.append(_format_keys("shape mismatches", mismatched))
        parts.append("  Check that the weights belong to this model and its config.json.")
        raise WeightImportError("\n".join(parts))
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor to export, made only when called: its torch-layout shape, float32."""

    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the made tensor."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __call__(self) -> np.ndarray:
        return self.make()


def export_lazy(
    module: nnx.Module,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    prefix: str = "",
    skip: nnx.filterlib.Filter = nothing,
) -> dict[str, LazyTensor]:
    """:func:`export_state` without the copies: torch key -> a :class:`LazyTensor` that makes
    the tensor (float32, torch layout, contiguous) when called, so a writer holds one at a time."""
    out: dict[str, LazyTensor] = {}
    params = nnx.All(nnx.Param, nnx.Not(skip))
    for path, var in nnx.to_flat_state(nnx.state(module, params)):
        key, layout = torch_key(_path_str(path), rules)
        # A zero-stride view: the torch-layout shape without touching the weights.
        shape = to_torch_layout(np.broadcast_to(np.float32(0), var.get_value().shape), layout).shape

        def make(var=var, layout=layout) -> np.ndarray:
            array = np.asarray(var.get_value(), dtype=np.float32)
            return np.ascontiguousarray(to_torch_layout(array, layout))

        out[prefix + key] = LazyTensor(tuple(shape), make)
    return out


def export_state(
    module: nnx.Module,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    prefix: str = "",
    skip: nnx.filterlib.Filter = nothing,
) -> dict[str, np.ndarray]:
    """The module's parameters as a torch-layout state dict (float32 numpy, contiguous), but
    those matching ``skip``."""
    return {k: make() for k, make in export_lazy(module, rules, prefix=prefix, skip=skip).items()}
