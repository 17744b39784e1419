"""People from unlabelled face photos, and a split by person.

CelebA's identities are not in the wheel, so photos are grouped by dlib descriptor distance:
single linkage at ``threshold``. dlib's own same-person rule (distance below 0.6) chains most of
these small CelebA faces into one group (626 of 964 photos), so people are grouped at 0.45
(about 36 pairs: the number of repeated people in these photos), and the split adds a guard:
a photo closer than ``guard`` to any held-out photo is left out of training and validation,
so a person whose two photos fall between the two thresholds cannot be on both sides.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SPLITS = ("train", "val", "heldout")


def group_people(descriptors: np.ndarray, threshold: float = 0.45) -> np.ndarray:
    """(N,) person labels 0..P-1: connected components of 'descriptor distance < threshold'."""
    d = np.asarray(descriptors, np.float64)
    if d.ndim != 2 or len(d) == 0:
        raise ValueError(f"descriptors must be a non-empty (N, 128) array, got {d.shape}")
    parent = np.arange(len(d))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    dist = distances(d)
    for i, j in zip(*np.nonzero(np.triu(dist < threshold, k=1)), strict=True):
        parent[root(int(i))] = root(int(j))
    roots = np.array([root(i) for i in range(len(d))])
    _, labels = np.unique(roots, return_inverse=True)  # first-seen order is not needed
    return labels.astype(np.int64)


def distances(descriptors: np.ndarray) -> np.ndarray:
    """(N, N) Euclidean distances between descriptors."""
    d = np.asarray(descriptors, np.float64)
    sq = np.sum(d * d, axis=1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * d @ d.T, 0.0))


@dataclasses.dataclass(frozen=True)
class PersonSplit:
    """Photo indices of each split, and the person label of every photo."""

    labels: np.ndarray
    train: list[int]
    val: list[int]
    heldout: list[int]
    excluded: list[int] = dataclasses.field(default_factory=list)  # too close to held-out

    def people(self, split: str) -> set[int]:
        """Person labels in a split."""
        return {int(self.labels[i]) for i in getattr(self, split)}


def split_people(
    labels: np.ndarray,
    descriptors: np.ndarray | None = None,
    *,
    heldout_people: int = 120,
    val_people: int = 40,
    guard: float = 0.55,
    seed: int = 0,
) -> PersonSplit:
    """Split photos by person: every person with several photos is held out (their second photo
    tells identity transfer from copying), then random single-photo people up to
    ``heldout_people``; ``val_people`` more single-photo people validate; the rest train.
    With ``descriptors``, photos within ``guard`` of a held-out photo are excluded."""
    labels = np.asarray(labels)
    people, counts = np.unique(labels, return_counts=True)
    multi = [int(p) for p in people[counts > 1]]
    single = [int(p) for p in people[counts == 1]]
    rng = np.random.default_rng(seed)
    rng.shuffle(single)
    n_extra = max(0, heldout_people - len(multi))
    if n_extra + val_people > len(single):
        raise ValueError(
            f"{len(people)} people ({len(multi)} with several photos) cannot give "
            f"{heldout_people} held-out and {val_people} validation people"
        )
    held = set(multi) | set(single[:n_extra])
    val = set(single[n_extra : n_extra + val_people])
    which = {"heldout": held, "val": val}
    out = {s: [] for s in SPLITS}
    for i, person in enumerate(labels):
        split = next((s for s, ps in which.items() if int(person) in ps), "train")
        out[split].append(i)
    excluded = []
    if descriptors is not None:
        near = distances(descriptors)[:, out["heldout"]].min(axis=1) < guard
        excluded = [i for s in ("train", "val") for i in out[s] if near[i]]
        out = {s: [i for i in v if s == "heldout" or not near[i]] for s, v in out.items()}
    return PersonSplit(labels=labels, excluded=sorted(excluded), **out)
