"""A local GCS API for the bucket tests: ``gcp-storage-emulator`` with one fix.

    python tests/gcs_emulator.py start --port PORT --default-bucket bucket -M -q

Real GCS sends ``x-goog-generation`` (and ``x-goog-metageneration``) with every object
download; the emulator (2026.7.19) sends neither, and tensorstore, which Orbax writes arrays
with, then fails its OCDBT manifest reads with "Malformed StorageGeneration". The launcher adds
the two headers from the object's own resource, as GCS does, before the routes are built.
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    """The emulator's download, plus the generation headers of the object."""
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = _download_with_generation  # before server.py builds its route table

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main(sys.argv[1:]))
