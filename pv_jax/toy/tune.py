"""Stage ``tune``: choose each run's sampling guidance, and the run to release, on the validation
people, never the held-out ones.

Each PhotoVerse run samples every validation reference (training-split people the model never
trained on; ``splits.json``'s ``val``) with each guidance scale in ``STAGE_GUIDANCES`` through
the project's evaluation, with DDIM eta 1 (the third session of docs/experiments/history.md: eta 1
doubles the faces of every run) and every image its own seed. The rule: the guidance with the
highest identification among those whose face rate is at least ``MIN_FACE_SHARE`` of the best
face rate of the sweep (dlib must find faces for identity to count; the base model itself draws
few it finds, so an absolute bar would choose by face rate alone). The choice goes to the run's
own ``tuning.json``, which every sampler reads as the run's defaults (``pv_jax.sampling.tuned``).

The run to release (``choose_release``): the one whose own reference helps most on the
validation people (the x0 gap at t >= 600, the ladder's measure), among the runs whose face rate
is at least ``MIN_FACE_SHARE`` of the best run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

GUIDANCES = (1.0, 1.5, 2.0, 3.0, 5.0)  # the command line's default sweep
STAGE_GUIDANCES = (1.5, 3.0, 5.0)  # the stage's: four runs within make toy's time
STAGE_ETA = 1.0
MIN_FACE_SHARE = 0.75
TUNING = "tuning.json"
GATE_BAND = "600-1000"  # the x0 gap's band that chooses the release (high noise)


def choose(rows: dict[str, dict], min_face_share: float = MIN_FACE_SHARE) -> float:
    """The rule: the best identification among guidances whose face rate is at least
    ``min_face_share`` of the sweep's best (ties: the lower guidance). ``rows``: guidance (as
    str) -> identity_metrics of all images."""
    best = max(r["face_rate"] for r in rows.values())
    ok = {g: r for g, r in rows.items() if r["face_rate"] >= min_face_share * best}
    return float(max(ok, key=lambda g: (ok[g].get("identification", 0.0), -float(g))))


def choose_release(tunes: dict[str, dict], min_face_share: float = MIN_FACE_SHARE) -> str:
    """The run to release from each run's ``tune_guidance`` report: the largest validation x0
    gap in ``GATE_BAND`` among runs whose face rate (at their chosen guidance) is at least
    ``min_face_share`` of the best run's (ties: the first run)."""
    rate = {n: t["sweep"][str(t["guidance"])]["face_rate"] for n, t in tunes.items()}
    best = max(rate.values())
    ok = [n for n in tunes if rate[n] >= min_face_share * best]
    return max(ok, key=lambda n: tunes[n]["val_x0_gap"][GATE_BAND]["gap"])


def val_references(work: Path, count: int | None = None) -> tuple[list[Path], dict[str, str]]:
    """The validation photos (all, or the first ``count``) and the person of each."""
    from pv_jax.toy.data import load_split

    splits, people = load_split(work)
    names = sorted(splits["val"])[:count]
    folder = work / "photos" / "val"
    return [folder / n for n in names], {n: str(people[n]) for n in names}


def appearance_identification(
    images: np.ndarray, targets: np.ndarray, size: int = 8
) -> dict[str, float]:
    """Coarse appearance, a measure dlib takes no part in: image i was drawn from reference
    ``i // (len(images) // len(targets))``; is its nearest target photo, by the L2 distance of
    ``size`` x ``size`` RGB thumbnails (hair, skin, background, layout), its own? The rate and
    its chance; ``own_closer``, the share of (image, other target) pairs where the image is
    nearer its own target than that other one (chance 0.5; less noisy than the rate), with a
    95% bootstrap interval over images; and the mean distance to its own target against the
    others'."""
    from PIL import Image

    def thumbs(x):
        small = [Image.fromarray(a).resize((size, size), Image.BOX) for a in x]
        return np.stack([np.asarray(t, np.float32).ravel() / 255.0 for t in small])

    per = len(images) // len(targets)
    if per * len(targets) != len(images):
        raise ValueError(f"{len(images)} images do not split evenly over {len(targets)} targets")
    d = np.linalg.norm(thumbs(images)[:, None] - thumbs(targets)[None], axis=-1)
    own = np.repeat(np.arange(len(targets)), per)
    rows = np.arange(len(images))
    others = np.ones_like(d, bool)
    others[rows, own] = False
    closer = ((d[rows, own][:, None] < d) & others).sum(1) / (len(targets) - 1)  # per image
    boots = closer[np.random.default_rng(0).integers(0, len(closer), (1000, len(closer)))]
    return {
        "identification": float((d.argmin(1) == own).mean()),
        "chance": 1.0 / len(targets),
        "own_closer": float(closer.mean()),
        "own_closer_ci95": [float(x) for x in np.percentile(boots.mean(1), [2.5, 97.5])],
        "own_distance": float(d[rows, own].mean()),
        "other_distance": float(d[others].mean()),
    }


def sweep_guidance(
    pipe,
    work: Path,
    thresholds: dict[str, float],
    *,
    guidances=GUIDANCES,
    num_images: int = 1,
    num_references: int | None = None,
    steps: int = 25,
    own_seeds: bool = False,
    eta: float = 0.0,
) -> tuple[list[Path], dict[str, dict], dict[str, np.ndarray]]:
    """Sample every validation reference with each guidance through the project's evaluation:
    the references and, per guidance (as str), the identity metrics of all images (dlib
    scores them) with prompt following, and the images (reference-major, then prompt, then
    image). ``own_seeds``: every image its own seed; False: every reference the same seeds.
    ``eta``: DDIM's eta at sampling."""
    from pv_jax.evaluation.run import fmt
    from pv_jax.toy.evaluate import sample_and_score

    photos, people = val_references(work, num_references)
    rows, images = {}, {}
    for g in guidances:
        r = sample_and_score(
            pipe,
            photos,
            people,
            thresholds,
            num_images=num_images,
            steps=steps,
            guidance=g,
            own_seeds=own_seeds,
            eta=eta,
        )
        per_prompt = {p: m for p, m in r["identification"].items() if p != "all"}
        rows[str(g)] = dict(
            r["identification"]["all"],
            prompt_following=r["prompt_following"],
            # The trained prompt's faces apart: attribute words can cost the toy its faces.
            face_rate_by_prompt={p: m["face_rate"] for p, m in per_prompt.items()},
            identification_by_prompt={p: m.get("identification") for p, m in per_prompt.items()},
        )
        images[str(g)] = r["arrays"]["images"]
        m = rows[str(g)]
        print(
            f"guidance {g}: face rate {m['face_rate']:.2f}, identification "
            f"{fmt(m.get('identification'))} (chance {m['chance']:.3f}), own "
            f"{fmt(m.get('own_mean'))} vs other people {fmt(m.get('other_people_mean'))}"
        )
    return photos, rows, images


def tune_guidance(
    work: Path,
    run: Path,
    thresholds: dict[str, float],
    *,
    guidances=STAGE_GUIDANCES,
    num_images: int = 1,
    num_references: int | None = None,
    steps: int = 25,
    eta: float = STAGE_ETA,
) -> dict:
    """Sweep the guidance of ``run`` (a train_tpu.py workdir) on the validation people (every
    image its own seed, DDIM ``eta``) and measure its validation x0 gap; write the choice with
    the sweep to ``<run>/tuning.json`` and return it."""
    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.toy.diagnose import x0_gap_curve

    t0 = time.perf_counter()
    (run / TUNING).unlink(missing_ok=True)  # sweep the run, not its earlier choice
    pipe = PhotoVersePipeline.from_checkpoint(run)
    photos, rows, _ = sweep_guidance(
        pipe,
        work,
        thresholds,
        guidances=guidances,
        num_images=num_images,
        num_references=num_references,
        steps=steps,
        own_seeds=True,
        eta=eta,
    )
    step = pipe.bundle.source["step"]
    del pipe
    gap = x0_gap_curve(run, work, "val", steps=[step], count=len(photos))[0]["x0_gap"]
    report = {
        "split": "val",
        "step": step,
        "references": [p.name for p in photos],
        "num_images": num_images,
        "steps": steps,
        "eta": eta,
        "rule": f"max identification with face_rate >= {MIN_FACE_SHARE} x the best face_rate",
        "guidance": choose(rows),
        "sweep": rows,
        "val_x0_gap": gap,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (run / TUNING).write_text(json.dumps(report, indent=1))
    print(
        f"tune {run.name}: guidance {report['guidance']} (eta {eta}) on {len(photos)} validation "
        f"references, x0 gap t>=600 {gap[GATE_BAND]['gap'] * 100:+.2f}%, "
        f"{report['seconds']:.0f}s"
    )
    return report


def tune_runs(
    work: Path, out: Path, runs: dict[str, Path], release_to: Path | None = None, **sizes
) -> dict:
    """The tune stage: ``tune_guidance`` for each run (name -> workdir), then the release
    (``choose_release``) copied to ``release_to``; returns {"runs": reports, "release": name}."""
    from pv_jax.toy.photoverse import release

    thresholds = json.loads((out / "base_report.json").read_text())["thresholds"]
    tunes = {name: tune_guidance(work, run, thresholds, **sizes) for name, run in runs.items()}
    chosen = choose_release(tunes)
    if release_to is not None:
        release(runs[chosen], release_to)
    print(f"tune: release {chosen} ({runs[chosen]}) -> {release_to}")
    return {"runs": tunes, "release": chosen}


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.toy.tune --run DIR [--step N] --guidance 1 3 [--eta 1]``: validation
    identification and face rate of one checkpoint per guidance (the gate of the ladder), and
    the plain prompt's appearance match (``appearance_identification``); adds a JSON line to
    ``--into``. Chooses nothing: the tune stage does that."""
    import argparse

    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.toy.data import save_grid, split_arrays
    from pv_jax.toy.evaluate import PROMPTS

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.tune")
    p.add_argument("--run", type=Path, required=True, help="a train_tpu.py workdir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCES))
    p.add_argument("--references", type=int, help="the first N validation photos (default: all)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--images", type=int, default=1, help="images per reference and prompt")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM's")
    p.add_argument(
        "--own-seeds",
        action="store_true",
        help="every image its own seed (default: every reference the same seeds 0..)",
    )
    for name, what in (("gamma", "text-branch"), ("sigma", "image-branch"), ("alpha", "LoRA")):
        p.add_argument(f"--{name}", type=float, help=f"{what} weight (default: the run's config)")
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--models", type=Path, default=Path("models/toy_faces"))
    p.add_argument("--into", type=Path, help="a JSON-lines file collecting the results")
    p.add_argument("--grid", type=Path, help="a PNG of the best guidance: 8 people x prompts")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    thresholds = json.loads((args.models / "base_report.json").read_text())["thresholds"]
    weights = {k: getattr(args, k) for k in ("gamma", "sigma", "alpha")}
    overrides = {k: v for k, v in weights.items() if v is not None} or None
    pipe = PhotoVersePipeline.from_checkpoint(args.run, step=args.step, model_overrides=overrides)
    photos, rows, images = sweep_guidance(
        pipe,
        args.work,
        thresholds,
        guidances=args.guidance,
        num_references=args.references,
        steps=args.steps,
        num_images=args.images,
        own_seeds=args.own_seeds,
        eta=args.eta,
    )
    val = split_arrays(args.work, "val", next(iter(images.values())).shape[1])
    targets = val["target"][[list(val["source"]).index(photo.name) for photo in photos]]
    per_ref = len(PROMPTS) * args.images
    for g, m in rows.items():  # the plain prompt's images: the attribute words recolour the rest
        plain = np.concatenate(
            [images[g][i * per_ref :][: args.images] for i in range(len(photos))]
        )
        a = m["appearance"] = appearance_identification(plain, targets)
        print(f"guidance {g}: appearance {json.dumps(a)} (chance of own_closer 0.5)")
    row = {
        "run": str(args.run),
        "step": pipe.bundle.source["step"],  # the latest when --step is not given
        **{k: getattr(pipe.bundle.config, k) for k in weights},
        "split": "val",
        "references": len(photos),
        "images_per_prompt": args.images,
        "own_seeds": args.own_seeds,
        "eta": args.eta,
        "sweep": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.into:
        with args.into.open("a") as f:
            f.write(json.dumps(row) + "\n")
    best = max(rows, key=lambda g: rows[g].get("identification", 0.0))
    if args.grid:  # each of the first 8 people: the target, then each prompt's first image
        tiles = []
        for i in range(min(8, len(photos))):
            tiles += [targets[i], *images[best][i * per_ref : (i + 1) * per_ref : args.images]]
        save_grid(np.stack(tiles), args.grid, cols=1 + len(PROMPTS))
    print(
        f"val identification: best {rows[best].get('identification', 0):.3f} (chance "
        f"{rows[best]['chance']:.3f}) over guidances {args.guidance}, {row['seconds']:.0f}s"
    )
    return row


if __name__ == "__main__":
    main()
