"""Stage 3: PhotoVerse runs, the base model and the copy-paste ceiling on held-out people.

For each held-out reference photo it draws ``num_images`` images for "a photo of S*" and for
each attribute prompt, through the project's evaluation (``pv_jax.evaluation.evaluate``) with
the people of ``splits.json``, and reports per run: own-reference similarity, similarity to the
person's other photo, to other people (mean and max), identification against chance, face
rate and prompt following (attribute present with the word vs without it). Two baselines sit
beside the runs: the base model without PhotoVerse conditioning (the same prompts with "a
person", images paired with references by seed), and each reference's own 64 px crop (what
copying the reference would score).
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
    """Per attribute: the fraction of its prompt's images that show it, and of the plain
    prompt's images that do (the same statistic without the word)."""
    plain = images[[p == PROMPTS[0] for p in prompts]]
    out = {}
    for a, prompt in zip(attributes.ATTRIBUTES[1:], PROMPTS[1:], strict=True):
        mine = images[[p == prompt for p in prompts]]
        out[a] = {
            "with_word": float(attributes.present(a, mine, thresholds).mean()),
            "without_word": float(attributes.present(a, plain, thresholds).mean()),
        }
    return out


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


def evaluate_runs(
    work: Path,
    out: Path,
    runs: dict[str, Path],
    *,
    num_images: int = 2,
    num_references: int = 80,
    steps: int = 25,
    guidance: float = 5.0,
    own_seeds: bool = False,
) -> dict:
    """Evaluate each PhotoVerse run (name -> train_tpu.py workdir) and both baselines.
    ``own_seeds``: every image its own seed (as the base baseline's) instead of seeds 0..7 for
    every reference (the paired design that docs/EXPERIMENTS.md's numbers were measured with)."""
    from pv_jax.evaluation.run import identity_by_prompt
    from pv_jax.sampling.pipeline import PhotoVersePipeline, face_descriptor
    from pv_jax.toy.base import caption_contexts, sample_base
    from pv_jax.toy.data import split_arrays
    from pv_jax.toy.diagnose import conditioning_gain
    from pv_jax.weights.hf_folders import load_stable_diffusion

    t0 = time.perf_counter()
    photos, people = choose_references(work, num_references)
    thresholds = json.loads((out / "base_report.json").read_text())["thresholds"]
    report: dict = {"references": [p.name for p in photos], "num_images": num_images}
    report.update(steps=steps, guidance=guidance, own_seeds=own_seeds, runs={})
    ref_desc = None
    arrays = {}
    for name, workdir in runs.items():
        pipe = PhotoVersePipeline.from_checkpoint(workdir)
        r = sample_and_score(
            pipe,
            photos,
            people,
            thresholds,
            num_images=num_images,
            steps=steps,
            guidance=guidance,
            own_seeds=own_seeds,
        )
        ref_desc = r["arrays"]["ref_descriptors"]
        arrays[name] = r["arrays"]["images"]
        report["runs"][name] = {
            "identity": r["identification"],
            "prompt_following": r["prompt_following"],
            "conditioning_gain": conditioning_gain(pipe.bundle, work, "heldout"),
            "timings": r["timings"],
        }
    person = [people[p.name] for p in photos]
    per_ref = len(PROMPTS) * num_images
    ref_index = np.repeat(np.arange(len(photos)), per_ref)
    prompts = [p for _ in photos for p in PROMPTS for _ in range(num_images)]
    # Baseline 1: the base model, no PhotoVerse: "a person" prompts, same seeds per reference.
    sd = load_stable_diffusion(out / "sd")
    from pv_jax.diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_diffusers(sd.scheduler_config)
    ctx = caption_contexts(
        sd.text_encoder, sd.tokenizer, [attributes.caption(a) for a in attributes.ATTRIBUTES] + [""]
    )
    c = np.tile(np.repeat(ctx[:-1], num_images, axis=0), (len(photos), 1, 1))
    base_images = sample_base(
        sd.unet,
        sd.vae,
        c,
        ctx[-1:],
        list(range(len(c))),
        schedule=schedule,
        steps=steps,
        guidance=guidance,
    )
    base_desc = _descriptors(base_images, face_descriptor)
    report["runs"]["base model (no PhotoVerse)"] = {
        "identity": identity_by_prompt(base_desc, ref_index, ref_desc, person, prompts),
        "prompt_following": prompt_following(base_images, prompts, thresholds),
    }
    # Baseline 2: copying the reference: its own 64 px target crop, once per reference.
    held = split_arrays(work, "heldout", 64)
    crops = np.stack([held["target"][list(held["source"]).index(p.name)] for p in photos])
    copy_desc = _descriptors(crops, face_descriptor)
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
    _grids(out_eval, photos, crops, arrays, num_images)
    return report


def _descriptors(images: np.ndarray, face_descriptor) -> np.ndarray:
    found = [face_descriptor(im) for im in images]
    return np.stack([np.full(128, np.nan) if d is None else d for d in found])


def _grids(out: Path, photos, crops, arrays: dict[str, np.ndarray], num_images: int) -> None:
    """One PNG per run: rows = held-out people, columns = reference crop | samples per prompt."""
    from pv_jax.toy.data import save_grid

    per_ref = len(PROMPTS) * num_images
    rows = min(8, len(photos))
    for name, images in arrays.items():
        tiles = []
        for i in range(rows):
            tiles.append(crops[i])
            tiles.extend(images[i * per_ref : (i + 1) * per_ref])
        slug = name.split(" ")[0].replace("(", "")
        save_grid(np.stack(tiles), out / f"samples_{slug}.png", cols=1 + per_ref)
