"""Stage 2: PhotoVerse on the toy base with ``train_tpu.py``'s trainer and
``configs/toy_faces.py``, four runs: the paper's method (``full``), its two ablations (no face
loss, no image branch) and the identity-token recipe of the ladder [ours] (``identity``:
``configs/toy_faces.py:ladder_identity``).

Each run is an ordinary ``train_tpu.py`` workdir under ``<work>/pv_<variant>`` (resumable from
its checkpoints); equivalently ``python train_tpu.py --config configs/toy_faces.py:<config>
--workdir toy_work/pv_<variant> --config.base.sd_folder=models/toy_faces/sd_v2``. The run that
the tune stage chooses on the validation people is copied to ``<out>/photoverse``, which
``sample.py --ckpt`` and ``make demo`` load.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pv_jax.run_checkpoint import Checkpointer

RELEASE = "photoverse"
# Variant -> configs/toy_faces.py argument.
CONFIGS = {
    "full": "full",
    "no_face": "no_face",
    "no_image": "no_image",
    "identity": "ladder_identity",
}
# The continued base (docs/experiments/history.md, "The base"): the one that draws faces (0.80
# with eta 1). It is committed; a run from scratch has only the first base, ``sd``, and uses that.
BASES = ("sd_v2", "sd")


def base_folder(out: Path) -> Path:
    """The base the PhotoVerse runs train on: ``<out>/sd_v2`` where it exists, else ``<out>/sd``."""
    for name in BASES:
        if (out / name / "model_index.json").is_file():
            return out / name
    raise FileNotFoundError(
        f"{out} has no base model ({' or '.join(BASES)}): run the base stage first "
        "(python -m pv_jax.toy --stages base)"
    )


def run_config(variant: str, work: Path, out: Path, **train):
    """The toy config of a variant, reading this work folder's data and this base."""
    from configs import toy_faces

    if variant not in CONFIGS:
        raise ValueError(f"unknown toy variant {variant!r}: choose one of {list(CONFIGS)}")
    cfg = toy_faces.get_config(CONFIGS[variant])
    cfg.base.sd_folder = str(base_folder(out))
    cfg.base.clip_vision_folder = str(out / "clip_vision")
    cfg.data.data_dir = str(work / "faces_train")
    cfg.train.update(train)
    return cfg


def release(workdir: Path, dest: Path) -> Path:
    """Copy a run's latest checkpoint, metrics and tuned settings (``tuning.json``) to ``dest``:
    a workdir that ``sample.py`` loads, without the older checkpoints (the saved config names
    the base folders as the run was given them; relative ones are found from the workdir's
    parents, see ``load_trained``)."""
    ckpt = Checkpointer(workdir, every=1, keep=1)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint to release")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / str(step), dest / "checkpoints" / str(step))
    for name in ("metrics.jsonl", "tuning.json"):
        if (workdir / name).is_file():
            shutil.copy(workdir / name, dest / name)
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
    return out_runs
