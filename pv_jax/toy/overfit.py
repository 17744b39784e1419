"""Rung 0 of the ladder (docs/experiments/history.md): overfit a handful of training photos and
watch whether the model learns to use its reference.

The library's own train step (``pv_jax.train.step``) trains PhotoVerse on the same ``photos``
examples every step, with fixed branch weights (no random fusion by default: the image branch
alone, gamma 0 / sigma 2); every ``eval_every`` steps :func:`pv_jax.toy.diagnose.x0_gap`
measures own vs shuffled reference on those photos, and the gradient norm of each trainable
group is logged. A model that uses its reference opens a gap within a few hundred steps.

    python -m pv_jax.toy.overfit --steps 300 --name baseline       # the paper's initialisation
    python -m pv_jax.toy.overfit --name recipe --set model.gamma=1.0 --set model.sigma=1.0 \
        --set model.image_branch_init=zero                            # what rung 0 found

Rows go to ``--into`` (JSON lines; ``python -m pv_jax.toy.report --ladder`` tabulates them).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OverfitConfig:
    """One rung-0 run: which photos, how long, and how the x0 gap is measured."""

    photos: int = 8
    steps: int = 300
    eval_every: int = 100
    draws: int = 4  # timesteps per photo and band of the x0 gap
    fusion: bool = False  # random fusion (else the config's gamma / sigma every step)
    repeat: int = 1  # each photo this many times per batch (other noise and t)
    seed: int = 0
    grad_norms: bool = True  # log each trainable group's gradient norm at every measurement


def group_norms(tree: nnx.State) -> dict[str, float]:
    """The L2 norm of each trainable group of a state-shaped tree (gradients, updates)."""
    from pv_jax.photoverse.model import trainable_group

    sq: dict[str, float] = {}
    for path, leaf in nnx.to_flat_state(tree):
        v = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        g = trainable_group(path)
        sq[g] = sq.get(g, 0.0) + float(jnp.sum(jnp.square(v)))
    return {g: float(np.sqrt(s)) for g, s in sq.items()}


def photo_batch(
    bundle, arrays: dict[str, np.ndarray], n: int, repeat: int = 1, prompt: str = "a photo of S*"
):
    """The first ``n`` photos of a split as one training batch, each ``repeat`` times."""
    tokens = bundle.tokenizer([prompt] * n * repeat, bundle.config.words)
    batch = {
        k: jnp.asarray(np.tile(arrays[k][:n], (repeat,) + (1,) * (arrays[k].ndim - 1)))
        for k in ("reference", "target", "landmarks", "descriptor")
    }
    return dict(batch, input_ids=jnp.asarray(tokens.input_ids), slots=jnp.asarray(tokens.slots))


def overfit(bundle, arrays: dict[str, np.ndarray], cfg: Any, oc: OverfitConfig) -> dict:
    """Train ``bundle``'s PhotoVerse on the first ``oc.photos`` photos of ``arrays`` with the run
    config ``cfg`` (its ``optim`` and ``train`` groups); returns the history of x0 gaps, losses
    and gradient norms per group."""
    from tqdm import tqdm

    from pv_jax.photoverse import split_trainable
    from pv_jax.toy.diagnose import bundle_x0_errors, x0_gap
    from pv_jax.train.step import TrainState, make_train_step
    from pv_jax.train.trainer import make_optimizer_from_config

    pv = bundle.config
    graphdef, trainable, frozen = split_trainable(bundle.model)
    tx, lr = make_optimizer_from_config(cfg, with_schedule=True)
    step_fn = jax.jit(
        make_train_step(
            graphdef,
            tx,
            lr,
            noise_schedule=bundle.schedule,
            config=pv,
            seed=oc.seed,
            fusion=oc.fusion,
        )
    )
    batch = photo_batch(bundle, arrays, oc.photos, oc.repeat)

    @jax.jit
    def grads_of(trainable, frozen, key):
        from pv_jax.photoverse import photoverse_loss

        def loss(tr):
            model = nnx.merge(graphdef, tr, frozen)
            return photoverse_loss(model, batch, key, schedule=bundle.schedule, fusion=oc.fusion)[0]

        return jax.grad(loss)(trainable)

    errors = bundle_x0_errors(bundle)

    def measure(state: TrainState, step: int, losses: list[float]) -> dict:
        model = nnx.merge(graphdef, state.trainable, frozen)
        gap = x0_gap(
            model,
            bundle.schedule,
            bundle.tokenizer,
            arrays["target"][: oc.photos],
            arrays["reference"][: oc.photos],
            gamma=pv.gamma,
            sigma=pv.sigma,
            draws=oc.draws,
            seed=oc.seed,
            errors=errors,
            descriptors=arrays["descriptor"][: oc.photos] if pv.uses_identity else None,
        )
        row = {
            "step": step,
            "loss": float(np.mean(losses)) if losses else None,
            "x0_gap": gap,
            "param_norm": group_norms(state.trainable),
        }
        if oc.grad_norms:
            grads = grads_of(state.trainable, frozen, jax.random.key(oc.seed + 7))
            row["grad_norm"] = group_norms(grads)
        return row

    state = TrainState.create(trainable, tx, ema=False)
    history, losses, faces, t0 = [measure(state, 0, [])], [], [], time.perf_counter()
    bar = tqdm(range(1, oc.steps + 1), desc="overfit", leave=False, disable=None)
    for step in bar:
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["diffusion"]))
        faces.append(float(metrics["face"]))
        if step % oc.eval_every == 0 or step == oc.steps:
            history.append(dict(measure(state, step, losses), face=float(np.mean(faces))))
            losses, faces = [], []
            bar.set_postfix(gap=_brief(history[-1]["x0_gap"]))
    seconds = time.perf_counter() - t0
    gap = _brief(history[-1]["x0_gap"])
    print(f"overfit: {oc.steps} steps on {oc.photos} photos in {seconds:.0f}s, x0 gap {gap}")
    return {"history": history, "seconds": seconds, "trainable": state.trainable}


def _brief(gap: dict) -> str:
    return " ".join(f"{k}:{v['gap'] * 100:+.1f}%" for k, v in gap.items())


def wheel_arrays(count: int, size: int = 64, first: int = 0) -> dict[str, np.ndarray]:
    """Targets (``size`` px), references, landmarks and descriptors of ``count`` CelebA photos
    of the wheel from photo ``first`` on (those dlib finds a face in), preprocessed as the toy
    data stage does: for a plumbing run that needs no data stage (no choice is made from these
    photos)."""
    from pv_jax.data.preprocess import SkipError, load_image, preprocess_image
    from pv_jax.toy import wheel
    from pv_jax.toy.data import DataConfig
    from pv_jax.train.data import resize_target

    config = DataConfig().preprocess()
    rows = []
    for path in wheel.celeba_photos()[first:]:
        try:
            rec = preprocess_image(load_image(path), config, source=path.name)
        except SkipError:
            continue
        rows.append(
            (*resize_target(rec.target, rec.landmarks, size), rec.reference, rec.descriptor)
        )
        if len(rows) == count:
            break
    return {
        "target": np.stack([r[0] for r in rows]),
        "landmarks": np.stack([r[1] for r in rows]).astype(np.float32),
        "reference": np.stack([r[2] for r in rows]),
        "descriptor": np.stack([r[3] for r in rows]).astype(np.float32),
    }


def use_oracle_tokens(model) -> None:
    """Control: the image branch reads the masked reference's own toy-VAE latents (16x16 tokens of
    4 channels and their (x, y) position) instead of the image encoder, through a new adapter.
    It tells whether the UNet side can take a reference that holds the image's content."""
    from pv_jax.photoverse.adapters import Adapter

    width = model.unet.config.cross_attention_dim
    model.image_adapter.adapter = Adapter(
        6, width, model.config.adapter, dtype=jnp.float32, rngs=nnx.Rngs(1)
    )
    model.__class__ = _oracle_class()  # the graph keeps the class: merges build it too


def _oracle_tokens(model, images: jax.Array) -> jax.Array:
    from pv_jax.photoverse.losses import to_unit

    side = model.vae.config.downsample_factor * model.unet.config.sample_size
    x = to_unit(images)
    x = jax.image.resize(x, (x.shape[0], side, side, 3), "bilinear") * 2.0 - 1.0
    z = jax.lax.stop_gradient(model.vae.scale_latents(model.vae.encode(x)[0]))
    b, h, w, c = z.shape
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
    pos = jnp.broadcast_to(jnp.stack([xx, yy], -1), (b, h, w, 2))
    return jnp.concatenate([z, pos], -1).reshape(b, h * w, c + 2)


def _oracle_class():
    from pv_jax.models.clip import preprocess_images
    from pv_jax.photoverse import PhotoVerse

    class OraclePhotoVerse(PhotoVerse):
        def encode_reference(self, images, num_words=None):
            pixels = preprocess_images(images, self.image_encoder.config.image_size)
            states = self.image_encoder(pixels).hidden_states
            words = self.text_adapter(states, num_words)
            return words, self.image_adapter.adapter(_oracle_tokens(self, images))

    return OraclePhotoVerse


def rung0_config(overrides: dict[str, Any] | None = None):
    """The toy run config for rung 0: the image branch alone (gamma 0, sigma 2), no face loss,
    constant AdamW 1e-3 without warm-up; ``overrides`` as ``{"model.sigma": 1.0, ...}``."""
    from configs import toy_faces

    cfg = toy_faces.get_config("no_face")
    cfg.model.gamma, cfg.model.sigma = 0.0, 2.0
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    for k, v in (overrides or {}).items():
        group, field = k.split(".", 1)
        cfg[group][field] = v
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.toy.overfit``: one rung-0 run; appends its row to ``--into``."""
    import argparse
    import ast
    import contextlib

    from pv_jax.photoverse import split_trainable
    from pv_jax.photoverse.factory import build_bundle
    from pv_jax.toy.data import split_arrays
    from pv_jax.toy.diagnose import branch_outputs, rollout_identity

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.overfit")
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--models", type=Path, default=Path("models/toy_faces"))
    p.add_argument("--name", default="baseline")
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--fusion", action="store_true")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="noise, timesteps and fusion draws")
    p.add_argument(
        "--branch", action="store_true", help="also each layer's image share at t=500, after"
    )
    p.add_argument("--oracle", action="store_true", help="control: reference VAE latents as tokens")
    p.add_argument(
        "--identity",
        action="store_true",
        help="also the dlib identity kept by a 10-step rollout from t=400, own vs shuffled, after",
    )
    p.add_argument("--set", action="append", default=[], help="group.field=value (Python literal)")
    p.add_argument("--into", type=Path, default=Path("toy_work/overfit.jsonl"))
    args = p.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    for k, v in overrides.items():
        with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
            overrides[k] = ast.literal_eval(v)
    cfg = rung0_config(overrides)
    cfg.base.sd_folder = str(args.models / "sd")
    cfg.base.clip_vision_folder = str(args.models / "clip_vision")
    bundle = build_bundle(cfg, face_net=bool(cfg.model.face_weight) or args.identity)
    if args.oracle:
        use_oracle_tokens(bundle.model)
    arrays = split_arrays(args.work, "train", 64)
    fields = ("photos", "steps", "eval_every", "fusion", "repeat", "seed")
    oc = OverfitConfig(**{f: getattr(args, f) for f in fields})
    r = overfit(bundle, arrays, cfg, oc)
    graphdef, _, frozen = split_trainable(bundle.model)
    trained, pv = nnx.merge(graphdef, r["trainable"], frozen), bundle.config
    head = (trained, bundle.schedule, bundle.tokenizer)
    if args.branch:
        refs = arrays["reference"][: args.photos]
        targets = arrays["target"][: args.photos]
        r["branch_t500"] = branch_outputs(*head, targets, refs, 500, gamma=pv.gamma, sigma=pv.sigma)
    if args.identity:
        photos = {k: v[: args.photos] for k, v in arrays.items()}
        r["rollout_identity"] = rollout_identity(*head, photos, gamma=pv.gamma, sigma=pv.sigma)
        print(f"rollout identity: {r['rollout_identity']}")
    row = dict(name=args.name, overrides=overrides, oracle=args.oracle)
    row.update({f: getattr(args, f) for f in ("fusion", "repeat", "seed")})
    row.update({k: v for k, v in r.items() if k != "trainable"})
    args.into.parent.mkdir(parents=True, exist_ok=True)
    with args.into.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
