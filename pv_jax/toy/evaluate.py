"""Stage 3: PhotoVerse runs, the base model and the copy-paste ceiling on held-out people.

For each held-out reference photo it draws ``num_images`` images for "a photo of S*" and for
each attribute prompt, every image its own seed, through the project's evaluation
(``pv_jax.evaluation.evaluate``) with the people of ``splits.json``, each run at its own tuned
settings (``tuning.json``: guidance and eta chosen on the validation people), and reports per
run: own-reference similarity, similarity to the person's other photo, to other people (mean
and max), identification against chance, face rate, prompt following (attribute present with
the word vs without it) and the conditioning gain per band of t (own vs shuffled reference,
x0 error, ``pv_jax.toy.diagnose.x0_gap``). Two baselines sit beside the runs: the base model
without PhotoVerse conditioning (the same prompts with "a person", its own seed per image,
paired with references by order), and each reference's own 64 px crop (what copying the
reference would score).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pv_jax.toy import attributes

PROMPTS = [attributes.caption(a, "S*") for a in attributes.ATTRIBUTES]


def choose_references(work: Path, count: int) -> tuple[list[Path], dict[str, str]]:
    """Held-out photos: every photo of people with several photos, then single-photo people,
    up to ``count`` photos; and the person of each photo."""
    from pv_jax.toy.data import load_split

    splits, people = load_split(work)
    names = sorted(splits["heldout"])
    by_person: dict[int, list[str]] = {}
    for n in names:
        by_person.setdefault(people[n], []).append(n)
    several = [n for n in names if len(by_person[people[n]]) > 1]
    single = [n for n in names if len(by_person[people[n]]) == 1]
    chosen = sorted(several + single[: max(0, count - len(several))])
    folder = work / "photos" / "heldout"
    return [folder / n for n in chosen], {n: str(people[n]) for n in chosen}


def prompt_following(images: np.ndarray, prompts: list[str], thresholds: dict[str, float]) -> dict:
    """:func:`attributes.prompt_following` of images drawn for ``PROMPTS`` (``prompts[i]`` is
    image i's)."""
    by_attribute = {
        a: images[[p == prompt for p in prompts]]
        for a, prompt in zip(attributes.ATTRIBUTES, PROMPTS, strict=True)
    }
    return attributes.prompt_following(by_attribute, thresholds)


def sample_and_score(
    pipe,
    photos,
    people,
    thresholds,
    *,
    num_images,
    steps,
    guidance,
    own_seeds: bool = False,
    eta: float = 0.0,
) -> dict:
    """Every prompt of ``PROMPTS`` for every photo through ``pv_jax.evaluation.evaluate``:
    its report plus ``prompt_following``; every photo must be usable. ``own_seeds``: every
    image its own seed (as the base baseline's); False: each photo the same seeds (paired).
    ``eta``: DDIM's eta (0 deterministic, 1 DDPM's variance)."""
    from pv_jax.evaluation.run import evaluate

    r = evaluate(
        pipe,
        photos,
        PROMPTS,
        num_images=num_images,
        people=people,
        keep_images=True,
        steps=steps,
        guidance=guidance,
        eta=eta,
        batch_size=len(PROMPTS) * num_images,
        seed_stride=len(PROMPTS) * num_images if own_seeds else 0,
    )
    used = {row["reference"] for row in r["results"]}
    if len(used) != len(photos):
        raise RuntimeError(f"{len(photos) - len(used)} of {len(photos)} references were skipped")
    prompts = [row["prompt"] for row in r["results"]]
    r["prompt_following"] = prompt_following(r["arrays"]["images"], prompts, thresholds)
    return r


# The base baseline's sampling: the guidance its own sweep chose on validation seeds at eta 1
# (docs/experiments/history.md, "The sampler": CFG 3, face rate 0.80 for sd_v2).
BASE_GUIDANCE, BASE_ETA = 3.0, 1.0
GAP_PHOTOS = 64  # held-out photos of the conditioning gain (x0 gap per band)


def evaluate_runs(
    work: Path,
    out: Path,
    runs: dict[str, Path],
    *,
    base: Path,
    num_images: int = 2,
    num_references: int = 80,
    steps: int = 25,
    own_seeds: bool = True,
    gap_photos: int = GAP_PHOTOS,
) -> dict:
    """Evaluate each PhotoVerse run (name -> train_tpu.py workdir) at its tuned guidance and
    eta, and both baselines (``base``: the SD folder the runs trained on). ``own_seeds``: every
    image its own seed; False: seeds 0..7 for every reference (the paired design of the first
    evaluation)."""
    from pv_jax.evaluation.run import identity_by_prompt
    from pv_jax.face.references import image_descriptors
    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.toy.base_eval import sample_plain
    from pv_jax.toy.diagnose import x0_gap_curve
    from pv_jax.weights.hf_folders import load_stable_diffusion

    t0 = time.perf_counter()
    photos, people = choose_references(work, num_references)
    thresholds = json.loads((out / "base_report.json").read_text())["thresholds"]
    report: dict = {"references": [p.name for p in photos], "num_images": num_images}
    report.update(steps=steps, own_seeds=own_seeds, base=base.name, runs={})
    ref_desc = None
    arrays = {}
    for name, workdir in runs.items():
        pipe = PhotoVersePipeline.from_checkpoint(workdir)
        tuned = {"guidance": pipe.defaults.guidance, "eta": pipe.defaults.eta}
        r = sample_and_score(
            pipe,
            photos,
            people,
            thresholds,
            num_images=num_images,
            steps=steps,
            own_seeds=own_seeds,
            **tuned,
        )
        step = pipe.bundle.source["step"]
        del pipe
        ref_desc = r["arrays"]["ref_descriptors"]
        arrays[name] = r["arrays"]["images"]
        gap = x0_gap_curve(workdir, work, "heldout", steps=[step], count=gap_photos)[0]
        report["runs"][name] = {
            "step": step,
            "sampling": tuned,
            "identity": r["identification"],
            "prompt_following": r["prompt_following"],
            "x0_gap": gap["x0_gap"],
            "timings": r["timings"],
        }
        print(f"eval {name}: {time.perf_counter() - t0:.0f}s", flush=True)
    person = [people[p.name] for p in photos]
    per_ref = len(PROMPTS) * num_images
    ref_index = np.repeat(np.arange(len(photos)), per_ref)
    prompts = [p for _ in photos for p in PROMPTS for _ in range(num_images)]
    # Baseline 1: the base model, no PhotoVerse: "a person" prompts, its own seed per image
    # (distinct from the runs' seeds), images in the runs' order (reference, prompt, image).
    sd = load_stable_diffusion(base)
    captions = [attributes.caption(a) for a in attributes.ATTRIBUTES]
    base_images = None
    for k, caption in enumerate(captions):
        rows = [i for i in range(len(prompts)) if (i % per_ref) // num_images == k]
        seeds = [100_000 + i for i in rows]
        drawn = sample_plain(sd, caption, seeds, guidance=BASE_GUIDANCE, steps=steps, eta=BASE_ETA)
        if base_images is None:
            base_images = np.empty((len(prompts), *drawn.shape[1:]), np.uint8)
        base_images[rows] = drawn
    base_desc = image_descriptors(base_images)
    report["runs"]["base model (no PhotoVerse)"] = {
        "sampling": {"guidance": BASE_GUIDANCE, "eta": BASE_ETA},
        "identity": identity_by_prompt(base_desc, ref_index, ref_desc, person, prompts),
        "prompt_following": prompt_following(base_images, prompts, thresholds),
    }
    # Baseline 2: copying the reference: its own 64 px target crop, once per reference.
    held = split_arrays_of(work, photos)
    copy_desc = image_descriptors(held["crops"])
    report["runs"]["copy the reference"] = {
        "identity": identity_by_prompt(
            copy_desc, np.arange(len(photos)), ref_desc, person, [PROMPTS[0]] * len(photos)
        ),
    }
    arrays["base model (no PhotoVerse)"] = base_images
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out_eval = out / "eval"
    out_eval.mkdir(parents=True, exist_ok=True)
    (out_eval / "toy_eval.json").write_text(json.dumps(report, indent=1))
    _grids(out_eval, photos, people, held, arrays, num_images)
    return report


def split_arrays_of(work: Path, photos: list[Path]) -> dict:
    """The 64 px target crops of the chosen held-out photos (``crops``, in their order) and of
    every held-out photo by name (``by_name``), for the copy baseline and the grids."""
    from pv_jax.toy.data import split_arrays

    held = split_arrays(work, "heldout", 64)
    by_name = dict(zip(list(held["source"]), held["target"], strict=True))
    return {"crops": np.stack([by_name[p.name] for p in photos]), "by_name": by_name}


def _grids(
    out: Path, photos, people: dict[str, str], held: dict, arrays: dict, num_images: int
) -> None:
    """One PNG per run; each row one held-out person (the first 8 with another photo): the
    reference's crop, the person's other photo (grey where there is none), then the samples
    per prompt."""
    from pv_jax.toy.data import save_grid

    per_ref = len(PROMPTS) * num_images
    names = [p.name for p in photos]
    others = {
        n: [m for m in held["by_name"] if m != n and people.get(m) == people[n]] for n in names
    }
    rows = sorted(range(len(names)), key=lambda i: (not others[names[i]], i))
    seen, chosen = set(), []
    for i in rows:  # one row per person
        if people[names[i]] not in seen and len(chosen) < 8:
            seen.add(people[names[i]])
            chosen.append(i)
    blank = np.full_like(held["crops"][0], 128)
    for name, images in arrays.items():
        tiles = []
        for i in chosen:
            other = others[names[i]]
            tiles += [held["crops"][i], held["by_name"][other[0]] if other else blank]
            tiles.extend(images[i * per_ref : (i + 1) * per_ref])
        slug = name.split(" ")[0].replace("(", "")
        save_grid(np.stack(tiles), out / f"samples_{slug}.png", cols=2 + per_ref)
