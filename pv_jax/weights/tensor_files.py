"""Tensor files, apart from the model folders they live in: safetensors read tensor by tensor
(and PyTorch ``.bin`` pickles, with torch), and safetensors written tensor by tensor, in one file
or in shards with diffusers' / transformers' ``.index.json``: the peak memory of a write is its
largest tensor, whatever the file's size."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pv_jax.errors import InputError
from pv_jax.host_memory import release_freed_memory
from pv_jax.weights.convert import LazyTensor, TensorSource


class CheckpointFolderError(InputError, FileNotFoundError):
    """A folder that is not the model folder it was expected to be (the user named it: an
    InputError, reported by the command lines as one line)."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_source(path: Path, handle) -> dict[str, Callable[[], np.ndarray]]:
    """Lazy readers for each tensor of a safetensors file.

    Tensors are read with ``readinto`` rather than through a memory map: mapped file pages count
    as resident memory, which doubled the peak RSS of importing SD1.5 (bench/load.py).
    """
    try:
        (n,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(n))
    except (struct.error, ValueError) as e:
        raise CheckpointFolderError(f"{path} is not a valid safetensors file ({e})") from e
    start = 8 + n

    def read(info: dict) -> np.ndarray:
        b, e = info["data_offsets"]
        out = np.empty(e - b, np.uint8)
        handle.seek(start + b)
        if handle.readinto(out) != e - b:
            raise CheckpointFolderError(f"{path} is truncated")
        return out.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])

    for key, info in header.items():
        if key != "__metadata__" and info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise CheckpointFolderError(f"{path}: tensor {key} has unsupported dtype {info}")
    return {k: (lambda i=i: read(i)) for k, i in header.items() if k != "__metadata__"}


@contextmanager
def open_tensors(files: list[Path]) -> Iterator[TensorSource]:
    """A lazy key -> array source over safetensors or torch ``.bin`` files."""
    source: dict[str, Callable[[], np.ndarray]] = {}
    with ExitStack() as stack:
        for path in files:
            if path.name.endswith(".safetensors"):
                handle = stack.enter_context(open(path, "rb"))  # noqa: SIM115 (ExitStack closes)
                source.update(_safetensors_source(path, handle))
            else:
                source.update(_torch_bin(path))
        try:
            yield source
        finally:
            release_freed_memory()  # each tensor was read into its own host buffer


def _torch_bin(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointFolderError(
            f"{path} is a PyTorch pickle: install torch (pip install 'pv-jax[torch]') or convert "
            "it to safetensors"
        ) from e
    # weights_only: never execute code from a pickle; mmap keeps memory near one tensor.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {
        k: (lambda t=t: t.float().numpy() if t.is_floating_point() else t.numpy())
        for k, t in state.items()
    }


_DTYPE_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, LazyTensor | np.ndarray],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file one tensor at a time: the peak is the largest tensor, not the
    whole state dict twice over (``safetensors.numpy.save_file`` copies every tensor to bytes).

    :class:`LazyTensor` values are made as they are written. The file appears complete or not
    at all (written beside it, then renamed).
    """
    path = Path(path)
    if "__metadata__" in tensors:
        raise ValueError(f"{path}: '__metadata__' is safetensors' header key, not a tensor name")
    if metadata and not all(isinstance(v, str) for v in (*metadata, *metadata.values())):
        raise ValueError(f"{path}: safetensors metadata maps str to str, got {metadata!r}")
    # safetensors' own order: larger elements first, then by name, so every tensor's data starts
    # aligned to its element size (readers that view the file's bytes in place need that).
    order = sorted(tensors, key=lambda k: (-np.dtype(tensors[k].dtype).itemsize, k))
    header: dict[str, Any] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        dtype = np.dtype(t.dtype)
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"{path}: tensor {key} has dtype {dtype}, which safetensors lacks")
        size = t.nbytes  # (LazyTensor's and ndarray's alike)
        header[key] = dict(
            dtype=_DTYPE_CODES[dtype], shape=list(t.shape), data_offsets=[offset, offset + size]
        )
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key in order:
                t = tensors[key]
                array = np.asarray(t() if isinstance(t, LazyTensor) else t)
                array = array if array.flags.c_contiguous else array.copy(order="C")
                want = (header[key]["shape"], header[key]["dtype"])
                if (list(array.shape), _DTYPE_CODES.get(array.dtype)) != want:
                    raise ValueError(
                        f"{path}: tensor {key} was made as {array.shape} {array.dtype}, "
                        f"announced as {want}"
                    )
                f.write(array.reshape(-1).view(np.uint8).data)
                del array
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_sharded_safetensors(
    folder: str | os.PathLike,
    name: str,
    tensors: Mapping[str, LazyTensor | np.ndarray],
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int = 10 * 2**30,
) -> list[Path]:
    """Write ``tensors`` as ``{name}.safetensors``, or, past ``max_shard_bytes``, as shards
    ``{name}-00001-of-0000N.safetensors`` with ``{name}.safetensors.index.json`` (the layout
    ``from_pretrained`` reads; diffusers' default shard size). Tensor by tensor, as
    :func:`write_safetensors`; tensors keep their order across the shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for key in tensors:
        n = tensors[key].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        return [write_safetensors(folder / f"{name}.safetensors", tensors, metadata)]
    files = [f"{name}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    paths = [
        write_safetensors(folder / f, {k: tensors[k] for k in keys}, metadata)
        for f, keys in zip(files, shards, strict=True)
    ]
    index = {
        "metadata": {"total_size": sum(tensors[k].nbytes for k in tensors)},
        "weight_map": {k: f for f, keys in zip(files, shards, strict=True) for k in sorted(keys)},
    }
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths
