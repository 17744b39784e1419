"""Generate images of the person in a reference photo: ``python sample.py --ckpt DIR --ref
photo.jpg --prompt "a photo of S* as an astronaut"``.

``--ckpt`` is the ``--workdir`` of a ``train_tpu.py`` run (its config names the base SD and CLIP
folders; ``--sd-folder``/``--clip-vision-folder`` override them). ``--tiny`` instead samples tiny
random networks (the embedded demo: untrained, so the images are noise). Writes PNGs, a contact
sheet (reference crops, masks, results) and ``samples.json`` (settings, seeds, timings, identity
similarity of each result to the reference) under ``--out``. The sampling flags are the fields of
``pv_jax.sampling.options.SamplingOptions``. Bad settings, prompts and photos are reported (one
line, exit status 2) before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pv_jax.errors import run_command
from pv_jax.face.references import load_reference
from pv_jax.sampling.cli import check_model_args, pipeline_from_args
from pv_jax.sampling.options import add_sampling_args, check_prompts, options_from_args


def contact_sheet(result, size: int = 160) -> Image.Image:
    """References (crop, mask) on the first row, results below, each ``size`` px square."""
    refs = [r.reference for r in result.references]
    masks = [np.repeat(r.reference_mask[..., None] * 255, 3, -1) for r in result.references]
    rows = [refs + masks, list(result.images)]
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * size, len(rows) * size), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            tile = Image.fromarray(np.asarray(img, np.uint8)).resize((size, size))
            sheet.paste(tile, (x * size, y * size))
    return sheet


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, check the photos and prompts, load the model, sample, write the
    outputs; returns the metadata written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a train_tpu.py workdir (a local folder or gs://BUCKET/run)")
    src.add_argument("--tiny", action="store_true", help="tiny random networks (demo, tests)")
    p.add_argument("--ref", action="append", required=True, help="reference photo (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="prompt with S* (repeatable)")
    p.add_argument("--sd-folder")
    p.add_argument("--clip-vision-folder")
    p.add_argument("--out", type=Path, default=Path("outputs"))
    add_sampling_args(p)
    args = p.parse_args(argv)

    # Everything that can be wrong with the input fails here, before the model load (20 s to
    # minutes): settings, prompts, paths, and the photos' faces (dlib needs no diffusion model).
    options = options_from_args(args)
    check_prompts(args.prompt, options)
    check_model_args(args)
    references = [load_reference(r, face_index=options.face_index) for r in args.ref]
    t0 = time.perf_counter()
    pipe, weights = pipeline_from_args(args)
    load_s = time.perf_counter() - t0
    result = pipe(references, args.prompt, options)
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(result.images):
        path = args.out / f"sample_{i:03d}.png"
        Image.fromarray(img).save(path)
        files.append(str(path))
    contact_sheet(result).save(args.out / "contact_sheet.png")
    meta = dict(result.metadata, images=files, weights=weights, load_s=round(load_s, 3))
    (args.out / "samples.json").write_text(json.dumps(meta, indent=2))
    sims = [s for s in meta["identity_similarity"] if s is not None]
    print(
        f"sample: {len(files)} images ({meta['resolution']} px, {meta['steps']} DDIM steps, "
        f"CFG {meta['guidance']}) -> {args.out} | load {load_s:.1f}s, compile "
        f"{meta['timings']['compile_s']:.1f}s, run {meta['timings']['run_s']:.2f}s "
        f"({meta['timings']['s_per_image']:.2f}s/image) | identity "
        + (
            f"{np.mean(sims):.3f} ({len(sims)}/{len(files)} with a face)"
            if sims
            else "n/a (no face found)"
        )
        + f" | {weights}"
    )
    return meta


def cli(argv: list[str] | None = None) -> None:
    """The command: errors in the input are one line on stderr and exit status 2."""
    run_command("sample.py", main, argv)


if __name__ == "__main__":
    cli()
