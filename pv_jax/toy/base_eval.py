"""How good is the toy base (the ceiling of everything after it)? Face rate, memorisation and
prompt following of plain text-to-image samples, through the library's sampler.

- *Face rate*: the fraction of "a photo of a person" samples in which dlib finds a face
  (``pv_jax.sampling.pipeline.face_descriptor``: HOG after upscaling to 256 px).
- *Memorisation*: the fraction of samples whose nearest training face is a near-copy: nearest
  pixel distance under a third of the second nearest (mirrored photos count as the photo).
- *Prompt following*: per attribute word, the fraction of samples that show it, with the word
  and without (``pv_jax.toy.attributes``, thresholds from the training photos).

The guidance is chosen on validation seeds (face rate, ties to the lower scale), then every
number is measured on other seeds: ``python -m pv_jax.toy.base_eval --sd models/toy_faces/sd``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PLAIN = "a photo of a person"
VAL_SEEDS = range(10_000, 10_064)  # the guidance and the snapshot are chosen on these
TEST_SEED0 = 20_000  # report seeds start here


def sample_plain(sd, prompt: str, seeds, *, guidance: float, steps: int = 25, batch: int = 32):
    """uint8 samples (N, H, W, 3) of one prompt, image i from the noise of ``seeds[i]``."""
    from pv_jax.sampling.txt2img import decode_latents, txt2img_latents

    c = sd.unet.config
    shape = (c.sample_size, c.sample_size, c.in_channels)
    seeds = list(seeds)
    out = []
    for i in range(0, len(seeds), batch):
        part = seeds[i : i + batch]
        noise = jnp.stack([jax.random.normal(jax.random.key(s), shape) for s in part])
        lat = txt2img_latents(sd, [prompt] * len(part), noise=noise, steps=steps, guidance=guidance)
        out.append(np.asarray(decode_latents(sd, lat) * 255.0 + 0.5).astype(np.uint8))
    return np.concatenate(out)


def face_rate(images: np.ndarray) -> float:
    """The fraction of images in which dlib finds a face."""
    from pv_jax.sampling.pipeline import face_descriptor

    return float(np.mean([face_descriptor(im) is not None for im in images]))


def near_copies(samples: np.ndarray, train: np.ndarray, ratio: float = 1.0 / 3.0) -> np.ndarray:
    """Per sample: is its nearest training photo (or that photo mirrored) closer than ``ratio``
    times the second nearest? Pixel L2 distances on uint8 images of one size."""
    s = samples.reshape(len(samples), -1).astype(np.float32)
    d = None
    for t in (train, train[:, :, ::-1]):
        t = t.reshape(len(t), -1).astype(np.float32)
        sq = (s**2).sum(1)[:, None] + (t**2).sum(1)[None] - 2.0 * s @ t.T
        dist = np.sqrt(np.maximum(sq, 0.0))
        d = dist if d is None else np.minimum(d, dist)
    two = np.sort(d, axis=1)[:, :2]
    return two[:, 0] < ratio * two[:, 1]


def base_quality(
    sd,
    work: Path,
    *,
    guidances=(1.0, 2.0, 3.0, 5.0),
    samples: int = 64,
    attribute_samples: int = 32,
    steps: int = 25,
) -> dict:
    """The base's face rate (guidance chosen on ``VAL_SEEDS``), memorisation and prompt following
    on report seeds."""
    from pv_jax.toy import attributes
    from pv_jax.toy.base import prompt_following
    from pv_jax.toy.data import split_arrays

    t0 = time.perf_counter()
    size = sd.vae.config.downsample_factor * sd.unet.config.sample_size
    train = split_arrays(work, "train", size)["target"]
    sweep = {
        g: face_rate(sample_plain(sd, PLAIN, VAL_SEEDS, guidance=g, steps=steps)) for g in guidances
    }
    best = max(sweep.values())
    guidance = min(g for g, r in sweep.items() if r == best)
    seeds = range(TEST_SEED0, TEST_SEED0 + samples)
    plain = sample_plain(sd, PLAIN, seeds, guidance=guidance, steps=steps)
    images = {"plain": plain[:attribute_samples]}
    for a in attributes.ATTRIBUTES:
        if a != "plain":
            images[a] = sample_plain(
                sd,
                attributes.caption(a),
                seeds[:attribute_samples],
                guidance=guidance,
                steps=steps,
            )
    thresholds = attributes.calibrate(train)
    return {
        "guidance_sweep_val_face_rate": {str(g): r for g, r in sweep.items()},
        "guidance": guidance,
        "samples": samples,
        "face_rate": face_rate(plain),
        "near_copy_rate": float(near_copies(plain, train).mean()),
        "prompt_following": prompt_following(images, thresholds),
        "seconds": round(time.perf_counter() - t0, 1),
        "_images": images,
    }


def snapshot_curve(sd, run: Path, *, guidance: float = 3.0, steps: int = 25) -> list[dict]:
    """Face rate on ``VAL_SEEDS`` of ``sd``'s UNet (step 0: where the run started) and of every
    ``ema_<step>.npz`` snapshot of a base run: the curve of face rate against steps, at one
    guidance."""
    import dataclasses

    from pv_jax.toy.fit import load_snapshot

    snaps = {int(p.stem.split("_")[1]): p for p in run.glob("ema_*.npz")}
    rows = []
    for step in [0, *sorted(snaps)]:
        model = (
            sd if step == 0 else dataclasses.replace(sd, unet=load_snapshot(sd.unet, snaps[step]))
        )
        images = sample_plain(model, PLAIN, VAL_SEEDS, guidance=guidance, steps=steps)
        rows.append({"step": step, "guidance": guidance, "val_face_rate": face_rate(images)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.toy.base_eval --sd DIR``: print the report, write it to ``--out``."""
    import argparse

    from pv_jax.toy.data import save_grid
    from pv_jax.weights.hf_folders import load_stable_diffusion

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.base_eval")
    p.add_argument("--sd", type=Path, default=Path("models/toy_faces/sd"))
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--out", type=Path, help="a JSON report (and a PNG grid beside it)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--snapshot", type=Path, help="evaluate this ema_<step>.npz UNet instead")
    p.add_argument("--curve", type=Path, help="a base run folder: face rate of every snapshot")
    args = p.parse_args(argv)
    sd = load_stable_diffusion(args.sd)
    if args.curve:
        rows = snapshot_curve(sd, args.curve)
        if args.out:  # JSON lines, as ``python -m pv_jax.toy.report --ladder`` reads them
            args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"curve": rows}
    if args.snapshot:
        import dataclasses

        from pv_jax.toy.fit import load_snapshot

        sd = dataclasses.replace(sd, unet=load_snapshot(sd.unet, args.snapshot))
    r = base_quality(sd, args.work, samples=args.samples)
    images = r.pop("_images")
    print(json.dumps(r, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(r, sd=str(args.sd)), indent=1))
        save_grid(np.concatenate([v[:8] for v in images.values()]), args.out.with_suffix(".png"), 8)
    return r


if __name__ == "__main__":
    main()
