"""PhotoVerse in PyTorch: serve a model that pv_jax trained, from its ``python -m pv_jax.export``
file, with diffusers / transformers components. Depends on torch, diffusers, transformers and
safetensors (and dlib for face detection: ``load_face``), never on JAX."""

from photoverse_torch.faces import Face, load_face
from photoverse_torch.model import (
    Export,
    PhotoVerseAdapters,
    PhotoVerseAttnProcessor,
    inject_words,
    install,
    knobs,
    preprocess_reference,
    read_export,
)
from photoverse_torch.pipeline import PhotoVerseTorchPipeline, TorchSample

__all__ = [
    "Export",
    "Face",
    "PhotoVerseAdapters",
    "PhotoVerseAttnProcessor",
    "PhotoVerseTorchPipeline",
    "TorchSample",
    "inject_words",
    "install",
    "knobs",
    "load_face",
    "preprocess_reference",
    "read_export",
]
