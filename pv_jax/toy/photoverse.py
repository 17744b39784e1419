"""Stage 2: PhotoVerse on the toy base with ``train_tpu.py``'s trainer and
``configs/toy_faces.py``, three runs: full, no face loss, no image branch.

Each run is an ordinary ``train_tpu.py`` workdir under ``<work>/pv_<variant>`` (resumable from
its checkpoints); equivalently ``python train_tpu.py --config configs/toy_faces.py:<variant>
--workdir toy_work/pv_<variant>``. The full run's last checkpoint is copied to
``<out>/photoverse``, which ``sample.py --ckpt`` and ``make demo`` load.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pv_jax.run_checkpoint import Checkpointer

RELEASE = "photoverse"


def run_config(variant: str, work: Path, out: Path, **train):
    """The toy config of a variant, reading this work folder's data and this base."""
    from configs import toy_faces

    cfg = toy_faces.get_config(variant)
    cfg.base.sd_folder = str(out / "sd")
    cfg.base.clip_vision_folder = str(out / "clip_vision")
    cfg.data.data_dir = str(work / "faces_train")
    cfg.train.update(train)
    return cfg


def release(workdir: Path, dest: Path) -> Path:
    """Copy a run's latest checkpoint and metrics to ``dest``: a workdir that ``sample.py``
    loads, without the older checkpoints (the saved config names the base folders as the run
    was given them; relative ones are found from the workdir's parents, see ``load_trained``)."""
    ckpt = Checkpointer(workdir, every=1, keep=1)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint to release")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / str(step), dest / "checkpoints" / str(step))
    shutil.copy(workdir / "metrics.jsonl", dest / "metrics.jsonl")
    return dest


def train_runs(work: Path, out: Path, variants, **train) -> dict:
    """Train (or resume) each variant; returns {variant: run summary}."""
    from pv_jax.train import trainer

    out_runs = {}
    for variant in variants:
        t0 = time.perf_counter()
        workdir = work / f"pv_{variant}"
        summary = trainer.train(run_config(variant, work, out, **train), workdir)
        out_runs[variant] = dict(trainer.summary_dict(summary), wall_s=time.perf_counter() - t0)
        shutil.copy(workdir / "metrics.jsonl", out / f"photoverse_{variant}_metrics.jsonl")
        if variant == "full":
            release(workdir, out / RELEASE)
    return out_runs
