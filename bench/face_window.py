"""Experiment: the face loss's latent window against the whole-image decode, on real faces.

    python bench/face_window.py                       # every part below
    python bench/face_window.py --parts toy,sd15_256 --faces 8

For each VAE (the toy VAE of ``models/toy_faces`` at 64 px; SD1.5-size random weights at 256
and 512 px) and held-out CelebA people of the toy split (never used to choose the window), the
target crop is encoded (posterior mean), decoded whole and through the window, and dlib itself
(``face_recognition_model_v1``) describes both faces at the same landmarks. Prints one JSON
object per part: the descriptor cosine window vs full (min / mean), the share of chips inside
the window, and as a baseline the cosine between the full decode and the original photo.

Parts ``grad_toy`` and ``grad_sd15_256``: the gradient of the face loss (and of the whole
loss) with respect to the trainable parameters, window vs full decode, on a batch of real faces
with timesteps in the face range; their cosine. The toy part uses the toy base (VAE, UNet,
CLIP) with the paper recipe's trained toy weights (``toy_work/pv_full`` from ``make toy``, or
``PV_JAX_FULL_RUN=DIR``; the numbers in docs/BENCHMARKS.md were measured on the first base's
400-step run, the release of that time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "toy_faces"
WINDOW = 0.625


def heldout_faces(n: int, size: int) -> list:
    """Preprocessed held-out CelebA faces of the toy split at a target size."""
    from pv_jax.data.preprocess import FaceRecord, PreprocessConfig, preprocess_file
    from pv_jax.toy.wheel import celeba_photo

    names = json.loads((TOY / "splits.json").read_text())["splits"]["heldout"]
    out = []
    for name in names:
        rec = preprocess_file(celeba_photo(name), PreprocessConfig(target_size=size))
        if isinstance(rec, FaceRecord):
            out.append(rec)
        if len(out) == n:
            break
    return out


def load_part_vae(part: str):
    """The VAE of a part and its target resolution."""
    from pv_jax.models.presets import SD15_VAE, random_module
    from pv_jax.models.vae import AutoencoderKL
    from pv_jax.weights.hf_folders import load_vae

    if part == "toy":
        return load_vae(TOY / "vae"), 64
    vae = random_module(lambda rngs: AutoencoderKL(SD15_VAE, rngs=rngs), np.random.default_rng(0))
    return vae, int(part.split("_")[1])


def descriptor_part(part: str, faces: int) -> dict:
    """dlib descriptor cosine of window vs full decodes of real faces."""
    from pv_jax.data.preprocess import target_descriptor
    from pv_jax.photoverse.losses import decode_face_windows
    from pv_jax.toy.vae import cosine

    vae, size = load_part_vae(part)
    recs = heldout_faces(faces, size)
    model = types.SimpleNamespace(vae=vae)
    cos_win, cos_base, fits = [], [], []
    t0 = time.perf_counter()

    @jax.jit
    def both(image01, landmarks):
        mean, _ = vae.encode(image01 * 2.0 - 1.0)
        z = vae.scale_latents(mean)
        full = vae.decode_images(z)
        factor = size // z.shape[1]
        win = max(1, int(np.ceil(WINDOW * z.shape[1])))
        window, lms, fit = decode_face_windows(model, z, landmarks, win, factor)
        return full, window, lms, fit

    for rec in recs:
        image = jnp.asarray(rec.target[None], jnp.float32) / 255.0
        full, window, lms, fit = jax.device_get(both(image, jnp.asarray(rec.landmarks[None])))
        u8 = lambda x: np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)  # noqa: E731
        d_full = target_descriptor(u8(full[0]), rec.landmarks, 0)
        d_win = target_descriptor(np.ascontiguousarray(u8(window[0])), lms[0], 0)
        d_photo = rec.descriptor
        cos_win.append(float(cosine(d_full[None], d_win[None])[0]))
        cos_base.append(float(cosine(d_full[None], d_photo[None])[0]))
        fits.append(bool(fit[0]))
    return {
        "part": part,
        "resolution": size,
        "window": WINDOW,
        "faces": len(recs),
        "cos_window_vs_full_min": round(min(cos_win), 5),
        "cos_window_vs_full_mean": round(float(np.mean(cos_win)), 5),
        "chips_inside_window": round(float(np.mean(fits)), 3),
        "baseline_cos_full_decode_vs_photo_mean": round(float(np.mean(cos_base)), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _cos_tree(a, b) -> float:
    fa = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
    fb = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
    return float(jnp.dot(fa, fb) / (jnp.linalg.norm(fa) * jnp.linalg.norm(fb)))


def gradient_part(part: str, faces: int) -> dict:
    """Cosine of the trainable-parameter gradients, window vs full decode."""
    from flax import nnx

    from pv_jax.photoverse import build_bundle, photoverse_loss, split_trainable

    t0 = time.perf_counter()
    if part == "grad_toy":
        from pv_jax.toy.photoverse import run_config

        cfg = run_config("full", ROOT / "unused", TOY)
        bundle = build_bundle(cfg, face_net=True)
        # The paper recipe's trained weights: a run trained with configs/toy_faces.py:full (the
        # released run may be another recipe, whose weights do not fit this model).
        run = Path(os.environ.get("PV_JAX_FULL_RUN", "toy_work/pv_full"))
        size = cfg.data.resolution
        from pv_jax.run_checkpoint import Checkpointer

        ckpt = Checkpointer(run, every=1, keep=1)
        _, trainable, _ = split_trainable(bundle.model)
        from pv_jax.train import sharding

        rep = sharding.replicated(sharding.make_mesh(1, 1))
        shardings = jax.tree.map(lambda _: rep, trainable)
        weights, _ = ckpt.restore_weights(ckpt.latest_step(), trainable, shardings, ema=True)
        ckpt.close()
        nnx.update(bundle.model, weights)
    else:
        from configs import tiny
        from pv_jax.photoverse import PhotoVerseConfig

        cfg = tiny.get_config()
        cfg.model = PhotoVerseConfig().to_dict()
        cfg.base.kind = "random_sd15"
        cfg.base.remat = True
        size = 256
        bundle = build_bundle(cfg, face_net=True)
    recs = heldout_faces(faces, size)
    ids = bundle.tokenizer(["a photo of S*"] * len(recs), bundle.config.words)
    batch = {
        "reference": np.stack([r.reference for r in recs]),
        "target": np.stack([r.target for r in recs]),
        "landmarks": np.stack([r.landmarks for r in recs]),
        "descriptor": np.stack([r.descriptor for r in recs]),
        "input_ids": ids.input_ids,
        "slots": ids.slots,
        "timesteps": np.linspace(50, 450, len(recs)).astype(np.int32),
    }
    graphdef, trainable, frozen = split_trainable(bundle.model)

    def grads(window: float):
        pv_cfg = dataclasses.replace(bundle.config, face_window=window, face_batch_fraction=1.0)

        @jax.jit
        def run(trainable, frozen, batch):
            def terms(tr):
                m = nnx.merge(graphdef, tr, frozen)
                _, metrics = photoverse_loss(
                    m,
                    batch,
                    jax.random.key(0),
                    schedule=bundle.schedule,
                    config=pv_cfg,
                    fusion=False,
                )
                return metrics["face"], metrics

            def total(tr):
                m = nnx.merge(graphdef, tr, frozen)
                return photoverse_loss(
                    m,
                    batch,
                    jax.random.key(0),
                    schedule=bundle.schedule,
                    config=pv_cfg,
                    fusion=False,
                )[0]

            g_face, metrics = jax.grad(terms, has_aux=True)(trainable)
            return g_face, jax.grad(total)(trainable), metrics

        return run(trainable, frozen, batch)

    g_full, t_full, m_full = grads(1.0)
    g_win, t_win, m_win = grads(WINDOW)
    return {
        "part": part,
        "resolution": size,
        "window": WINDOW,
        "faces": len(recs),
        "grad_cos_face_term": round(_cos_tree(g_full, g_win), 5),
        "grad_cos_total_loss": round(_cos_tree(t_full, t_win), 6),
        "face_loss_full": round(float(m_full["face"]), 6),
        "face_loss_window": round(float(m_win["face"]), 6),
        "chips_inside_window": round(float(m_win["face_window_fit"]), 3),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    """Run the requested parts and print one JSON object each."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="toy,sd15_256,sd15_512,grad_toy,grad_sd15_256")
    p.add_argument("--faces", type=int, default=8)
    p.add_argument("--window", type=float, default=0.625, help="latent window fraction")
    args = p.parse_args()
    global WINDOW
    WINDOW = args.window
    for part in args.parts.split(","):
        fn = gradient_part if part.startswith("grad_") else descriptor_part
        faces = args.faces if part != "sd15_512" else max(1, args.faces // 2)
        print(json.dumps(fn(part, faces)), flush=True)


if __name__ == "__main__":
    main()
