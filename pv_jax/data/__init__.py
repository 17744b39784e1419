"""PhotoVerse data: per-photo preprocessing (face crops, landmarks, mask, descriptor) and the
array_record dataset written with tfds and read with grain, all without TensorFlow. The
command that builds the dataset is ``python -m pv_jax.data`` (``cli.py``).

Names are imported lazily so that ``python -m pv_jax.data.preprocess`` does not import its own
module twice (runpy warns when the package has already imported it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pv_jax.data.preprocess": (
        "SKIP_REASONS",
        "FaceRecord",
        "PreprocessConfig",
        "Skip",
        "SkipError",
        "load_image",
        "preprocess_file",
        "preprocess_image",
    ),
    "pv_jax.data.dataset": (
        "BuildOptions",
        "PhotoVerseFaces",
        "build_dataset",
        "decode_example",
        "load_source",
        "make_loader",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pv_jax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
