"""Evaluate identity preservation (and prompt following) over a set of reference photos.

    python -m pv_jax.evaluation --ckpt runs/pv_sd15 --refs eval_faces/ --num-images 4 \
        --clip-folder clip-vit-large-patch14 --out eval/

Each reference photo is one person. For every photo and prompt (default: the paper's protocol,
"a photo of S*") it generates ``--num-images`` images and reports

- identity similarity: the cosine between dlib face descriptors of the reference's target crop and
  of the largest face found in the generated image (the paper's metric, with the dlib net in place
  of ArcFace), and the fraction of images where a face is found at all;
- CLIP-T, when a CLIP folder is given: the cosine between CLIP's embeddings of the image and of the
  prompt with ``S*`` replaced by ``--subject``.

Writes ``eval.json`` (settings, per-image results, per-prompt and overall summaries, photos that
could not be used and why) and ``eval.md`` (the summary table); ``--save-images`` keeps the PNGs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pv_jax.errors import InputError, MissingPathError, ReferencePhotoError, run_command
from pv_jax.face import descriptor_cosine, unit_rows
from pv_jax.face.references import check_reference, image_descriptors, reference_descriptor
from pv_jax.sampling.cli import check_model_args, pipeline_from_args
from pv_jax.sampling.options import (
    SamplingOptions,
    add_sampling_args,
    check_prompts,
    options_from_args,
)
from pv_jax.sampling.pipeline import PhotoVersePipeline

PAPER_PROMPT = "a photo of S*"
# The evaluation's defaults where they differ from SamplingOptions'.
EVAL_DEFAULTS = {"num_images": 4}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The sampling settings copied from the pipeline's metadata into the report.
_SETTINGS = (
    "num_words",
    "steps",
    "eta",
    "strength",
    "guidance",
    "uncond",
    "gamma",
    "sigma",
    "alpha",
    "tuned_from",
    "image_source",
)


def find_photos(paths: Sequence[str | Path]) -> list[Path]:
    """Photo files among ``paths``: files as given, folders expanded (sorted, not recursive)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise MissingPathError(f"--refs {p}: no such file or folder")
    if not out:
        raise MissingPathError(
            f"no photos ({', '.join(IMAGE_SUFFIXES)}) in {list(map(str, paths))}"
        )
    return out


def _stats(values: list[float | None]) -> dict:
    found = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(found)) if found else None,
        "std": float(np.std(found)) if found else None,
        "n": len(found),
    }


def summarize(rows: list[dict]) -> dict:
    """Per-prompt and overall statistics of per-image rows (``prompt``, ``identity``, ``clip_t``).

    Identity is averaged over the images where a face was found; ``face_rate`` says how many.
    """

    def one(group: list[dict]) -> dict:
        identity = _stats([r["identity"] for r in group])
        clip_t = _stats([r.get("clip_t") for r in group])
        return {
            "images": len(group),
            "face_rate": identity["n"] / len(group) if group else 0.0,
            "identity_mean": identity["mean"],
            "identity_std": identity["std"],
            "clip_t_mean": clip_t["mean"],
            "clip_t_std": clip_t["std"],
        }

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    return {
        "per_prompt": {p: one([r for r in rows if r["prompt"] == p]) for p in prompts},
        "overall": one(rows),
    }


def identity_metrics(
    descriptors: np.ndarray,
    ref_index: np.ndarray,
    ref_descriptors: np.ndarray,
    ref_person: Sequence[str] | None = None,
) -> dict:
    """Identity beyond the own-reference cosine, over a set of references (one per photo).

    ``descriptors`` (N, 128): the generated images' dlib descriptors, NaN rows where no face was
    found; ``ref_index`` (N,): the reference each image was generated from; ``ref_descriptors``
    (R, 128); ``ref_person`` (R,): who each reference shows (photos of one person share it).

    - ``own``: cosine to the image's own reference (the paper's identity similarity);
    - ``identification``: the fraction of images whose most similar reference is their own
      (chance: 1 / R);
    - ``other_people_mean`` / ``other_people_max``: the mean and the largest cosine to
      references of *other* people, averaged over images (the baseline ``own`` must beat);
    - ``other_photo``: cosine to the *other* photos of the same person (MultiID-Bench's
      Sim(GT)), over the images whose person has another photo: copying the reference does not
      earn it.
    """
    desc, refs = np.asarray(descriptors, np.float64), unit_rows(ref_descriptors)
    idx = np.asarray(ref_index)
    person = np.asarray(
        ref_person if ref_person is not None else [str(i) for i in range(len(refs))]
    )
    found = ~np.isnan(desc).any(axis=1)
    out = {"images": int(len(desc)), "face_rate": float(found.mean()) if len(desc) else 0.0}
    out["references"], out["chance"] = int(len(refs)), 1.0 / len(refs)
    if not found.any():
        return out
    sims = unit_rows(desc[found]) @ refs.T  # (F, R)
    own_idx = idx[found]
    own = sims[np.arange(len(sims)), own_idx]
    other = person[None, :] != person[own_idx][:, None]  # references of other people
    same_other = (~other) & (np.arange(len(refs))[None, :] != own_idx[:, None])
    masked = np.where(other, sims, np.nan)
    out.update(
        own_mean=float(own.mean()),
        own_std=float(own.std()),
        identification=float(np.mean(np.argmax(sims, axis=1) == own_idx)),
        other_people_mean=float(np.nanmean(masked, axis=1).mean()),
        other_people_max=float(np.nanmax(masked, axis=1).mean()),
    )
    has_other = same_other.any(axis=1)
    if has_other.any():
        gt = np.where(same_other, sims, np.nan)[has_other]
        out.update(other_photo_mean=float(np.nanmean(gt, axis=1).mean()))
        out.update(other_photo_images=int(has_other.sum()))
        out.update(own_mean_same_images=float(own[has_other].mean()))
    return out


def identity_by_prompt(
    descriptors: np.ndarray,
    ref_index: np.ndarray,
    ref_descriptors: np.ndarray,
    ref_person: Sequence[str] | None,
    prompts: Sequence[str],
) -> dict:
    """:func:`identity_metrics` over all images ("all") and over each prompt's images."""
    prompts = np.asarray(prompts)
    out = {"all": identity_metrics(descriptors, ref_index, ref_descriptors, ref_person)}
    for p in dict.fromkeys(prompts.tolist()):
        which = prompts == p
        out[p] = identity_metrics(
            descriptors[which], np.asarray(ref_index)[which], ref_descriptors, ref_person
        )
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    """A table cell: ``digits`` decimals, "n/a" for None or NaN (no image had a face)."""
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """The summary as a markdown table: one row per prompt, then all prompts."""
    lines = [
        "| prompt | images | face found | identity (mean ± std) | CLIP-T (mean ± std) |",
        "|---|---|---|---|---|",
    ]
    rows = [*summary["per_prompt"].items(), ("**all**", summary["overall"])]
    for prompt, s in rows:
        identity = f"{fmt(s['identity_mean'])} ± {fmt(s['identity_std'])}"
        clip_t = f"{fmt(s['clip_t_mean'])} ± {fmt(s['clip_t_std'])}"
        lines.append(f"| {prompt} | {s['images']} | {s['face_rate']:.0%} | {identity} | {clip_t} |")
    return "\n".join(lines) + "\n"


def identification_table(identification: dict) -> str:
    """The identification metrics (one row per prompt, then all) as a markdown table."""
    lines = [
        "| prompt | images | face found | own ref | other photo | other people (mean / max) "
        "| identification | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for prompt, m in identification.items():
        lines.append(
            f"| {'**all**' if prompt == 'all' else prompt} | {m['images']} | "
            f"{m['face_rate']:.0%} | {fmt(m.get('own_mean'))} | {fmt(m.get('other_photo_mean'))}"
            f" | {fmt(m.get('other_people_mean'))} / {fmt(m.get('other_people_max'))} | "
            f"{fmt(m.get('identification'))} | {m['chance']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    pipe: PhotoVersePipeline,
    photos: Sequence[Path],
    prompts: Sequence[str],
    options: SamplingOptions | None = None,
    *,
    clip_scorer=None,
    subject: str = "a person",
    save_dir: Path | None = None,
    people: dict[str, str] | None = None,
    keep_images: bool = False,
    seed_stride: int = 0,
    **overrides,
) -> dict:
    """Generate for every photo and prompt and score the images; returns the report dict.

    ``options`` (default: the pipeline's defaults, a run's tuned settings, with
    ``EVAL_DEFAULTS``) with ``overrides`` of its
    fields (``num_images=2, steps=10``) set the sampling. With more than one usable photo the
    report also has ``identification`` (see :func:`identity_metrics`); ``people`` maps photo
    file names to a person, so that photos of one person count as the same identity and give
    ``other_photo``. ``keep_images`` puts the images (N, H, W, 3) and descriptors (N, 128; NaN
    without a face) under ``"arrays"`` (not JSON: the command leaves them out).
    ``seed_stride``: photo i samples from seed ``seed + i * seed_stride`` (0: every photo gets
    the same seeds, a paired design)."""
    opts = (options or pipe.defaults.replace(**EVAL_DEFAULTS)).replace(**overrides)
    rows, skipped, used, images, descriptors = [], [], [], [], []
    timings = {"compile_s": 0.0, "run_s": 0.0}
    for index, photo in enumerate(tqdm(photos, desc="evaluating", unit="photo")):
        try:
            photo_opts = opts.replace(seed=opts.seed + index * seed_stride)
            result = pipe([photo], prompts, photo_opts, identity=False)
        except ReferencePhotoError as e:  # recorded, and the other photos go on
            print(f"evaluate: skipping {e}", file=sys.stderr)
            skipped.append({"reference": str(photo), "error": str(e)})
            continue
        meta = result.metadata
        ref_desc = reference_descriptor(result.references)
        used.append((photo, ref_desc))
        found = image_descriptors(result.images)  # NaN rows: no face
        descriptors += list(found)
        if keep_images:
            images.append(result.images)
        for key in timings:
            timings[key] += meta["timings"][key]
        clip_t = [None] * len(result.images)
        if clip_scorer is not None:
            texts = [p.replace("S*", subject) for p in meta["prompts"]]
            clip_t = [float(x) for x in clip_scorer(result.images, texts)]
        for i, image in enumerate(result.images):
            row = {
                "reference": str(photo),
                "prompt": meta["prompts"][i],
                "seed": meta["seeds"][i],
                "identity": (
                    None if np.isnan(found[i, 0]) else float(descriptor_cosine(found[i], ref_desc))
                ),
                "clip_t": clip_t[i],
            }
            if save_dir is not None:
                path = save_dir / f"ref{index:03d}_{i:03d}.png"
                Image.fromarray(image).save(path)
                row["image"] = str(path)
            rows.append(row)
    if not rows:
        raise ReferencePhotoError(
            f"none of the {len(photos)} reference photos could be used: "
            + "; ".join(s["error"] for s in skipped)
        )
    report = {
        "references": [str(p) for p in photos],
        "skipped": skipped,
        "prompts": list(prompts),
        "num_images": opts.num_images,
        "subject": subject if clip_scorer is not None else None,
        "settings": {
            **{k: v for k, v in meta.items() if k in _SETTINGS},
            "face_index": opts.face_index,
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "summary": summarize(rows),
        "results": rows,
    }
    if len(used) > 1:
        ref_index = np.repeat(np.arange(len(used)), len(prompts) * opts.num_images)
        person = [(people or {}).get(p.name, str(p)) for p, _ in used]
        ref_desc = np.stack([d for _, d in used])
        report["identification"] = identity_by_prompt(
            np.stack(descriptors), ref_index, ref_desc, person, [r["prompt"] for r in rows]
        )
    if keep_images:
        report["arrays"] = {
            "images": np.concatenate(images),
            "descriptors": np.stack(descriptors),
            "ref_descriptors": np.stack([d for _, d in used]),
        }
    return report


def load_people(path: Path | None) -> dict[str, str] | None:
    """``--people``: the JSON object {photo file name: person}, or None without the flag."""
    if path is None:
        return None
    if not path.is_file():
        raise MissingPathError(f"--people {path}: no such file")
    try:
        people = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--people {path} is not JSON: {e}") from e
    if not isinstance(people, dict):
        raise InputError(f"--people {path} must hold a JSON object {{photo file name: person}}")
    return {str(k): str(v) for k, v in people.items()}


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, check the photos and prompts, load the models, evaluate, write eval.json
    and eval.md; returns the report."""
    p = argparse.ArgumentParser(
        prog="python -m pv_jax.evaluation", description=__doc__.split("\n")[0]
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train_tpu.py workdir (a local folder or gs://BUCKET/run)")
    src.add_argument("--tiny", action="store_true", help="tiny random networks (tests, a dry run)")
    p.add_argument("--refs", nargs="+", required=True, help="photos or folders; one person each")
    p.add_argument("--prompt", action="append", help=f"prompt with S* (default: {PAPER_PROMPT!r})")
    p.add_argument("--clip-folder", help="a transformers CLIPModel folder: also report CLIP-T")
    p.add_argument("--subject", default="a person", help="replaces S* in the CLIP-T text")
    p.add_argument(
        "--people",
        type=Path,
        help="JSON {photo file name: person}: photos of one person count as one identity",
    )
    p.add_argument("--sd-folder")
    p.add_argument("--clip-vision-folder")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--save-images", action="store_true")
    add_sampling_args(p, **EVAL_DEFAULTS)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    # Bad input fails here, in seconds, before any model is loaded (faces are looked for per
    # photo later: a photo without one is reported and skipped).
    options = options_from_args(args)
    prompts = args.prompt or [PAPER_PROMPT]
    check_prompts(prompts, options)
    photos = find_photos(args.refs)
    for photo in photos:
        check_reference(photo)
    people = load_people(args.people)
    check_model_args(args)
    clip_scorer = None
    if args.clip_folder:
        from pv_jax.evaluation.clip_score import CLIPScorer

        clip_scorer = CLIPScorer.from_folder(args.clip_folder)
    pipe, weights = pipeline_from_args(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = evaluate(
        pipe,
        photos,
        prompts,
        options,
        clip_scorer=clip_scorer,
        subject=args.subject,
        save_dir=args.out if args.save_images else None,
        people=people,
    )
    report["weights"] = weights
    report["clip_folder"] = args.clip_folder
    report["total_s"] = round(time.perf_counter() - t0, 2)
    (args.out / "eval.json").write_text(json.dumps(report, indent=2))
    header = (
        f"# PhotoVerse evaluation\n\n{weights}; {len(photos) - len(report['skipped'])} of "
        f"{len(photos)} reference photos used, {options.num_images} images per photo and "
        f"prompt, {options.steps} DDIM steps, CFG {options.guidance}. Identity: cosine of dlib "
        "face descriptors, over the images where a face was found.\n\n"
    )
    table = markdown_table(report["summary"])
    if "identification" in report:
        table += "\n## Identification over all references\n\n"
        table += identification_table(report["identification"])
    (args.out / "eval.md").write_text(header + table)
    overall = report["summary"]["overall"]
    print(
        f"evaluate: {overall['images']} images from {len(photos)} photos -> {args.out} | "
        f"identity {fmt(overall['identity_mean'])} (face found in {overall['face_rate']:.0%}) | "
        f"CLIP-T {fmt(overall['clip_t_mean'])} | compile {report['timings']['compile_s']:.1f}s, "
        f"run {report['timings']['run_s']:.1f}s, total {report['total_s']:.1f}s"
    )
    return report


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: errors in the input are one line on stderr and exit status 2."""
    run_command("evaluate", main, argv)
