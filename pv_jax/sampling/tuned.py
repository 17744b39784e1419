"""The sampling settings tuned for a trained run, read in one place.

A run's tuned settings live in ``tuning.json`` in its workdir, or one folder up for a folder
that holds several runs (``runs/tuning.json`` for ``runs/a``; the run's own file wins).
``pv_jax.toy``'s tune stage writes each run's (``models/toy_faces/photoverse/tuning.json``);
after a sweep of your own, write it by hand or with :func:`write_tuned`::

    {"guidance": 5.0, "eta": 1.0}

Its :data:`TUNABLE` fields become the run's sampling defaults wherever the run is loaded:
``sample.py``, ``python -m pv_jax.evaluation``, the web app and
``PhotoVersePipeline.from_checkpoint``. A flag or keyword still wins; a field the file does not
set keeps :class:`~pv_jax.sampling.options.SamplingOptions`'s default (guidance 7.5, eta 0).
Other keys (the tune stage's sweep) are kept for people and ignored here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pv_jax.errors import InputError
from pv_jax.paths import run_path

TUNED_FILE = "tuning.json"
# SamplingOptions fields a run may tune: what the image looks like, not how many or which seed.
TUNABLE = ("guidance", "eta", "steps", "uncond", "gamma", "sigma", "alpha", "num_words")


def tuned_path(workdir: str | os.PathLike) -> str | None:
    """The ``tuning.json`` that applies to a run (its own, else its folder's), or None."""
    run = run_path(workdir)
    for folder in (run, run.parent):
        if (folder / TUNED_FILE).is_file():
            return os.fspath(folder / TUNED_FILE)
    return None


def tuned_settings(workdir: str | os.PathLike) -> dict[str, Any]:
    """The run's tuned sampling settings (``{}`` when it has none); a file that is not a JSON
    object of valid settings raises InputError naming it and the fix."""
    from pv_jax.sampling.options import SamplingOptions

    path = tuned_path(workdir)
    if path is None:
        return {}
    fix = f"fix or delete {path} (it sets the run's sampling defaults: {', '.join(TUNABLE)})"
    try:
        data = json.loads(run_path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON ({e}): {fix}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a JSON object: {fix}")
    settings = {k: data[k] for k in TUNABLE if k in data}
    try:
        SamplingOptions(**settings)
    except (InputError, TypeError) as e:
        raise InputError(f"{path}: {e}: {fix}") from e
    return settings


def write_tuned(folder: str | os.PathLike, **settings: Any) -> str:
    """Record tuned sampling settings for the run(s) in ``folder`` (merged into its
    ``tuning.json``, checked as :func:`tuned_settings` reads them); returns the file's path."""
    unknown = sorted(set(settings) - set(TUNABLE))
    if unknown:
        raise InputError(f"not tunable sampling settings: {unknown}; choose from {TUNABLE}")
    from pv_jax.sampling.options import SamplingOptions

    path = run_path(folder) / TUNED_FILE
    data = {**(json.loads(path.read_text()) if path.is_file() else {}), **settings}
    SamplingOptions(**{k: data[k] for k in TUNABLE if k in data})  # bad values fail unwritten
    path.write_text(json.dumps(data, indent=1))
    return os.fspath(path)
