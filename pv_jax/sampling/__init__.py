"""Sampling PhotoVerse: the jitted DDIM loop with classifier-free guidance."""

from pv_jax.sampling.sampler import Sampler, SamplerSpec, denoise_loop, encode_references

__all__ = ["Sampler", "SamplerSpec", "denoise_loop", "encode_references"]
