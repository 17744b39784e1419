"""``python -m pv_jax.toy``: run the toy experiment's stages in order (each one resumable).

    python -m pv_jax.toy --work toy_work                 # every stage
    python -m pv_jax.toy --work toy_work --stages vae    # one stage (earlier ones must be done)
    python -m pv_jax.toy --work /tmp/t --quick           # a few steps of everything (tests)

Data and optimizer states go under ``--work`` (not committed: CelebA's photos are for
non-commercial research); trained models and reports go under ``--out``
(``models/toy_faces``: ``vae/``, ``sd/``, ``clip_vision/``), where a finished stage is found
and not run again. ``configs/toy_faces.py`` trains PhotoVerse on ``sd_v2/`` (the continued base,
committed; a run from scratch uses its own ``sd/``) and ``clip_vision/``. The tune stage chooses
each run's sampling and the run to release (``photoverse/``) on the validation people; the eval
stage measures every run on the held-out people.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

STAGES = ("data", "vae", "base", "photoverse", "tune", "eval")
# The paper's method, its two ablations, and the ladder's identity-token recipe [ours].
VARIANTS = ("full", "no_face", "no_image", "identity")


def main(argv: list[str] | None = None) -> dict:
    """Run the requested stages; returns each stage's report."""
    p = argparse.ArgumentParser(prog="python -m pv_jax.toy", description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("toy_work"), help="data, optimizer states")
    p.add_argument(
        "--out", type=Path, default=Path("models/toy_faces"), help="trained models and reports"
    )
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--quick", action="store_true", help="few photos and steps: a smoke run")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="PhotoVerse runs to train and evaluate",
    )
    p.add_argument(
        "--paired-seeds",
        action="store_true",
        help="eval: seeds 0..7 for every reference (default: every image its own seed)",
    )
    args = p.parse_args(argv)

    from pv_jax.toy import base, vae
    from pv_jax.toy.data import DataConfig, prepare

    data_cfg, vae_fit, unet_fit, vision_fit = (
        DataConfig(),
        vae.VAE_FIT,
        base.UNET_FIT,
        base.VISION_FIT,
    )
    samples = 16
    if args.quick:
        data_cfg = DataConfig(limit=48, heldout_people=8, val_people=4)
        quick = dict(steps=3, warmup=1, log_every=1, save_every=2)
        vae_fit = dataclasses.replace(vae_fit, batch_size=4, **quick)
        unet_fit = dataclasses.replace(unet_fit, batch_size=4, **quick)
        vision_fit = dataclasses.replace(vision_fit, batch_size=8, **quick)
        samples = 2
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    reports, t0 = {}, time.perf_counter()
    if "data" in args.stages:
        reports["data"] = prepare(work, data_cfg)
        print(f"data: {json.dumps(reports['data'])}")
    model = None
    if "vae" in args.stages or "base" in args.stages:
        model, reports["vae"] = vae.train_vae(work, args.out, vae_fit)
    if "base" in args.stages:
        reports["base"] = base.train_base(
            work, args.out, model, unet_fit=unet_fit, vision_fit=vision_fit, samples=samples
        )
    # The smoke run trains and evaluates the paper's method and the identity-token recipe (the
    # ablations differ in config fields, which tests/test_toy.py checks; each run costs a
    # compile).
    variants = ("full", "identity") if args.quick else tuple(args.variants)
    runs = {v: work / f"pv_{v}" for v in variants}
    if "photoverse" in args.stages:
        from pv_jax.toy.photoverse import train_runs

        quick_train = dict(steps=2, batch_size=2, checkpoint_every=2, sample_every=0)
        reports["photoverse"] = train_runs(
            work, args.out, variants, **(quick_train if args.quick else {})
        )
    if "tune" in args.stages:  # each run's sampling, and the release, on the validation people
        from pv_jax.toy.photoverse import RELEASE
        from pv_jax.toy.tune import tune_runs

        sizes = dict(guidances=(1.0, 2.0), num_references=2, steps=2) if args.quick else {}
        reports["tune"] = tune_runs(work, args.out, runs, args.out / RELEASE, **sizes)
    if "eval" in args.stages:
        from pv_jax.toy.evaluate import evaluate_runs
        from pv_jax.toy.photoverse import base_folder

        sizes = dict(num_images=1, num_references=4, steps=2, gap_photos=4) if args.quick else {}
        reports["eval"] = evaluate_runs(
            work,
            args.out,
            runs,
            base=base_folder(args.out),
            own_seeds=not args.paired_seeds,
            **sizes,
        )
    print(
        f"toy: stages {' '.join(args.stages)} done in {time.perf_counter() - t0:.0f}s -> "
        f"{args.out} (work: {work})"
    )
    return reports


if __name__ == "__main__":
    main()
    sys.exit(0)
