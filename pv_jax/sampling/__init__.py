"""Sampling PhotoVerse: the jitted DDIM loop with classifier-free guidance, and training's
sample grid."""

from pv_jax.sampling.grid import SampleGrid
from pv_jax.sampling.options import SamplingOptions
from pv_jax.sampling.sampler import Sampler, SamplerSpec, denoise_loop, encode_references

__all__ = [
    "SampleGrid",
    "Sampler",
    "SamplerSpec",
    "SamplingOptions",
    "denoise_loop",
    "encode_references",
]
