"""Stage ``tune``: choose the sampling guidance on the validation people, never the held-out ones.

The full run samples every validation reference (training-split people the model never trained
on; ``splits.json``'s ``val``) with each guidance scale in ``GUIDANCES`` through the project's
evaluation. The rule: the guidance with the highest identification among those whose face rate
is at least ``MIN_FACE_SHARE`` of the best face rate of the sweep (dlib must find faces for
identity to count; the base model itself draws few it finds, so an absolute bar would choose by
face rate alone). The held-out evaluation then uses the chosen value
(``<out>/tuning.json``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

GUIDANCES = (1.0, 1.5, 2.0, 3.0, 5.0)
MIN_FACE_SHARE = 0.75
TUNING = "tuning.json"


def choose(rows: dict[str, dict], min_face_share: float = MIN_FACE_SHARE) -> float:
    """The rule: the best identification among guidances whose face rate is at least
    ``min_face_share`` of the sweep's best (ties: the lower guidance). ``rows``: guidance (as
    str) -> identity_metrics of all images."""
    best = max(r["face_rate"] for r in rows.values())
    ok = {g: r for g, r in rows.items() if r["face_rate"] >= min_face_share * best}
    return float(max(ok, key=lambda g: (ok[g].get("identification", 0.0), -float(g))))


def chosen_guidance(out: Path) -> float:
    """The guidance the ``tune`` stage chose (``<out>/tuning.json``)."""
    path = out / TUNING
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the tune stage first (python -m pv_jax.toy --stages tune), "
            "which chooses the guidance on the validation people"
        )
    return float(json.loads(path.read_text())["guidance"])


def val_references(work: Path, count: int | None = None) -> tuple[list[Path], dict[str, str]]:
    """The validation photos (all, or the first ``count``) and the person of each."""
    from pv_jax.toy.data import load_split

    splits, people = load_split(work)
    names = sorted(splits["val"])[:count]
    folder = work / "photos" / "val"
    return [folder / n for n in names], {n: str(people[n]) for n in names}


def tune_guidance(
    work: Path,
    out: Path,
    run: Path,
    *,
    guidances=GUIDANCES,
    num_images: int = 1,
    num_references: int | None = None,
    steps: int = 25,
) -> dict:
    """Sweep the guidance of ``run`` (a train_tpu.py workdir) on the validation people, write
    ``<out>/tuning.json`` and return it."""
    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.toy.evaluate import sample_and_score

    t0 = time.perf_counter()
    photos, people = val_references(work, num_references)
    thresholds = json.loads((out / "base_report.json").read_text())["thresholds"]
    pipe = PhotoVersePipeline.from_checkpoint(run)
    rows = {}
    for g in guidances:
        r = sample_and_score(
            pipe,
            photos,
            people,
            thresholds,
            num_images=num_images,
            steps=steps,
            guidance=g,
        )
        rows[str(g)] = dict(r["identification"]["all"], prompt_following=r["prompt_following"])
        m = rows[str(g)]
        print(
            f"tune: guidance {g}: face rate {m['face_rate']:.2f}, identification "
            f"{m.get('identification', 0):.3f} (chance {m['chance']:.3f}), own "
            f"{m.get('own_mean', float('nan')):.3f} vs other people "
            f"{m.get('other_people_mean', float('nan')):.3f}"
        )
    report = {
        "split": "val",
        "references": [p.name for p in photos],
        "num_images": num_images,
        "steps": steps,
        "rule": f"max identification with face_rate >= {MIN_FACE_SHARE} x the best face_rate",
        "guidance": choose(rows),
        "sweep": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / TUNING).write_text(json.dumps(report, indent=1))
    print(
        f"tune: chose guidance {report['guidance']} on {len(photos)} validation references "
        f"in {report['seconds']:.0f}s"
    )
    return report
