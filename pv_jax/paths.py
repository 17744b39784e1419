"""Run paths on local disk or in a bucket (``gs://``, ``s3://``, ...), through ``etils.epath``.

Orbax itself reads and writes through ``epath`` (and tensorstore for the arrays), so a workdir
such as ``gs://BUCKET/run`` holds checkpoints, metrics, TensorBoard and sample grids that
outlive the VM. ``epath`` reaches GCS with ``gcsfs`` (no TensorFlow needed); an emulator is
honoured through ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage) and
``TENSORSTORE_GCS_HTTP_URL`` (tensorstore).
"""

from __future__ import annotations

import os
import re

from etils import epath

from pv_jax.errors import InputError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI (``gs://bucket/run``), False for a local path."""
    return bool(_URI.match(os.fspath(path)))


def run_path(path: str | os.PathLike) -> epath.Path:
    """An ``epath.Path`` for a run folder: URIs as given, local paths made absolute."""
    text = os.fspath(path)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))


def refresh(path: str | os.PathLike) -> None:
    """Forget this process's cached listings of a bucket path (no-op for local paths).

    gcsfs caches every directory listing for the life of the process, so without this a process
    never sees the checkpoints that another process (the training run) wrote after its first
    look: a sampler or evaluator that polls a live run, or a test that watches one.
    """
    if is_remote(path):
        from etils.epath import backend

        backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def require_local(path: str | os.PathLike, what: str) -> None:
    """Raise InputError when ``path`` is a URI where only local files can be read."""
    if is_remote(path):
        raise InputError(
            f"{what}={os.fspath(path)!r} is in a bucket, but it is read with local file I/O "
            "only: copy it to local disk (`gcloud storage cp -r`) or mount the bucket "
            "(`gcsfuse`) and pass the local path"
        )
