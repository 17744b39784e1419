"""pv_jax's noise for a seed, without JAX: the start noise ``jax.random.normal(
jax.random.key(seed), shape)`` and, for DDIM with eta > 0, each step's variance noise
(``pv_jax.diffusion.schedules.step_keys``: the seed's key folded with 1, split into one key per
step), with threefry 2x32 in the partitionable bit layout, float32, in numpy, so that the
PyTorch pipeline draws the images ``sample.py`` draws for the same seeds.

Bits and uniforms are exact; the normal's inverse error function is torch's, which differs from
XLA's float32 approximation in the last bits (about 1e-7 relative).
"""

from __future__ import annotations

import numpy as np
import torch

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: np.ndarray, d: int) -> np.ndarray:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray):
    """The Threefry-2x32 hash (20 rounds) of counter pairs under a key, as JAX computes it."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x = [x0.astype(np.uint32) + ks[0], x1.astype(np.uint32) + ks[1]]
    with np.errstate(over="ignore"):
        for i in range(5):
            for r in _ROTATIONS[i % 2]:
                x[0] = x[0] + x[1]
                x[1] = _rotl(x[1], r) ^ x[0]
            x[0] = x[0] + ks[(i + 1) % 3]
            x[1] = x[1] + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x[0], x[1]


def seed_key(seed: int) -> tuple[int, int]:
    """``jax.random.key(seed)``'s threefry key as JAX builds it without x64 (pv_jax's setting):
    the seed is an int32, so the high word is 0 and the low word its 32 bits."""
    seed = int(seed)
    if not -(2**31) <= seed < 2**31:
        raise ValueError(f"seed {seed} is not a 32-bit integer, as JAX's seeds are")
    return 0, seed & 0xFFFFFFFF


def fold_in(key: tuple[int, int], data: int) -> tuple[int, int]:
    """``jax.random.fold_in(key, data)``: the key hashes the pair (0, data)."""
    b0, b1 = threefry2x32(key, np.zeros(1, np.uint32), np.array([data], np.uint32))
    return int(b0[0]), int(b1[0])


def split(key: tuple[int, int], num: int) -> list[tuple[int, int]]:
    """``jax.random.split(key, num)`` (partitionable): key i hashes the counter (0, i)."""
    b0, b1 = threefry2x32(key, np.zeros(num, np.uint32), np.arange(num, dtype=np.uint32))
    return [(int(a), int(b)) for a, b in zip(b0, b1, strict=True)]


def random_bits(key: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """32-bit random bits of ``shape`` (JAX's partitionable threefry layout)."""
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.uint64)
    hi, lo = (index >> np.uint64(32)).astype(np.uint32), index.astype(np.uint32)
    b0, b1 = threefry2x32(key, hi, lo)
    return (b0 ^ b1).reshape(shape)


def uniform(key: tuple[int, int], shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """float32 uniforms in [lo, hi) from 23 mantissa bits, as ``jax.random.uniform``."""
    bits = (random_bits(key, shape) >> np.uint32(9)) | np.uint32(0x3F800000)
    floats = bits.view(np.float32) - np.float32(1.0)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    return np.maximum(lo32, floats * (hi32 - lo32) + lo32)


def normal(seed: int | tuple[int, int], shape: tuple[int, ...]) -> torch.Tensor:
    """``jax.random.normal(jax.random.key(seed), shape)`` (float32) as a torch tensor; a key
    pair instead of a seed draws from that key."""
    key = seed if isinstance(seed, tuple) else seed_key(seed)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = torch.from_numpy(uniform(key, shape, lo, 1.0))
    return np.float32(np.sqrt(2)) * torch.special.erfinv(u)


def start_noise(seeds: list[int], latent: int, channels: int) -> torch.Tensor:
    """pv_jax's start latents of images with ``seeds``: (B, C, h, w), NCHW for diffusers (ours
    draws (h, w, C) per image)."""
    return torch.stack(
        [normal(s, (latent, latent, channels)).permute(2, 0, 1) for s in seeds]
    ).contiguous()


def step_noise(seeds: list[int], steps: int, latent: int, channels: int) -> torch.Tensor:
    """pv_jax's DDIM variance noise (eta > 0) of images with ``seeds``: (steps, B, C, h, w),
    step i of image b from ``split(fold_in(key(seed_b), 1), steps)[i]``."""
    keys = [split(fold_in(seed_key(s), 1), steps) for s in seeds]
    return torch.stack(
        [
            torch.stack([normal(k[i], (latent, latent, channels)).permute(2, 0, 1) for k in keys])
            for i in range(steps)
        ]
    ).contiguous()
