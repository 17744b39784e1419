"""Benchmark: the PyTorch PhotoVerse pipeline (photoverse_torch, from an export) against our
jitted sampler, seconds per image, one process.

    python bench/torch_pipeline.py --preset toy                  # the committed toy run, 64 px
    python bench/torch_pipeline.py --preset sd15 --resolution 512 --steps 25   # minutes

``toy``: models/toy_faces/photoverse and its export on the toy base folders. ``sd15``: random
SD1.5-size networks (UNet, VAE, CLIP text, CLIP ViT-L/14 vision, PhotoVerse's additions), the
same weights copied into diffusers / transformers modules and the trained parts exported in
memory. Both draw ``--images`` images of the astronaut one at a time (batch 1, CFG, DDIM, fp32;
PyTorch on ``--threads`` threads) after one untimed image (ours compiles there). Prints one JSON
object: ``ours_s_per_image, torch_s_per_image, ratio`` and the setting.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch

ROOT = Path(__file__).resolve().parent.parent
ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


def toy_pair(tmp: Path):
    """(our bundle, the torch pipeline) of the committed toy run, through its export file."""
    from photoverse_torch import PhotoVerseTorchPipeline
    from pv_jax.export import write_export
    from pv_jax.run_checkpoint import load_trained

    bundle = load_trained(ROOT / "models/toy_faces/photoverse")
    path = tmp / "toy.safetensors"
    write_export(bundle, path)
    pipe = PhotoVerseTorchPipeline.from_export(
        path,
        sd_folder=bundle.source["base"]["sd_folder"],  # the base the run trained on
        clip_vision_folder=ROOT / "models/toy_faces/clip_vision",
    )
    return bundle, pipe


def sd15_pair():
    """(our bundle, the torch pipeline) on random SD1.5-size networks, the same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from photoverse_torch import Export, PhotoVerseTorchPipeline
    from pv_jax.export import export_tensors
    from pv_jax.photoverse import PhotoVerseConfig, random_photoverse, split_trainable
    from pv_jax.weights.convert import CLIP_RULES, export_state
    from sample import torch_pipeline

    bundle = random_photoverse(PhotoVerseConfig(), "sd15", with_face_net=False)
    sd = torch_pipeline(bundle, bundle.schedule.to_diffusers())
    vision = CLIPVisionModel(CLIPVisionConfig(**bundle.model.image_encoder.config.to_hf()))
    state = export_state(bundle.model.image_encoder, CLIP_RULES)
    vision.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    _, trainable, _ = split_trainable(bundle.model)
    export = Export(
        tensors={k: torch.from_numpy(v) for k, v in export_tensors(trainable).items()},
        config=bundle.config.to_dict(),
        base={"kind": "random_sd15"},
        run={},
        sampling={},
    )
    pipe = PhotoVerseTorchPipeline(
        unet=sd.unet,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        image_encoder=vision.eval(),
        scheduler=sd.scheduler,
        export=export,
    )
    return bundle, pipe


def main() -> None:
    """Run both pipelines and print the JSON row."""
    import tempfile

    from pv_jax.face.references import load_reference
    from pv_jax.sampling.pipeline import PhotoVersePipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="toy", choices=["toy", "sd15"])
    p.add_argument("--resolution", type=int, default=None, help="sd15 only (default 256)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--images", type=int, default=2, help="timed images per pipeline")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, pipe = toy_pair(Path(tmp)) if args.preset == "toy" else sd15_pair()
    build_s = time.perf_counter() - t0
    resolution = None if args.preset == "toy" else (args.resolution or 256)
    ours = PhotoVersePipeline(bundle, resolution=resolution)
    record = load_reference(ASTRONAUT)
    prompt = "a photo of S*"
    knobs = dict(steps=args.steps, guidance=args.guidance)

    def run_ours(seed: int) -> float:
        meta = ours([record], [prompt], seed=seed, identity=False, **knobs).metadata
        return meta["timings"]["run_s"]

    from photoverse_torch.jax_noise import start_noise

    def run_torch(seed: int) -> float:
        t = time.perf_counter()
        noise = start_noise([seed], ours.latent, ours.latent_channels)  # ours' size and seed
        desc = record.descriptor[None] if bundle.config.uses_identity else None
        pipe(record.reference[None], prompt, noise=noise, descriptors=desc, **knobs)
        return time.perf_counter() - t

    run_ours(0)  # compiles
    ours_s = float(np.median([run_ours(s) for s in range(1, args.images + 1)]))
    run_torch(0)
    torch_s = float(np.median([run_torch(s) for s in range(1, args.images + 1)]))
    row = {
        "preset": args.preset,
        "resolution": ours.resolution,
        "steps": args.steps,
        "guidance": args.guidance,
        "images": args.images,
        "threads": args.threads,
        "ours_s_per_image": round(ours_s, 3),
        "torch_s_per_image": round(torch_s, 3),
        "ratio": round(ours_s / torch_s, 3),
        "build_s": round(build_s, 1),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
