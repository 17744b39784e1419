"""Does a PhotoVerse run use its reference? The conditioning gain of the diffusion loss.

:func:`x0_gap` is the measure: the relative gap in x0 error between a shuffled and the own
reference, per band of timesteps, on the same noise, with a bootstrap interval over photos.
Epsilon MSE is SNR x x0-MSE, so it hides high noise, where a reference matters most; the x0
error weighs every timestep of a band by what the model gets wrong about the image. A model
that carries identity from the reference predicts the image better with its own reference than
with someone else's; equal errors mean the reference is ignored, whatever the loss curve says.
Beside it: each cross-attention layer's branches (:func:`branch_outputs`), the identity kept by
a short rollout (:func:`rollout_identity`) and what the image encoder keeps
(:func:`encoder_probe`). The first sessions' epsilon-MSE table per conditioning
(``conditioning_gain``, superseded by the x0 gap) is at commit 7604998.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pv_jax.diffusion import add_noise, predict_x0, rollout_x0
from pv_jax.photoverse.losses import to_unit

# Bands of the x0 gap: low, middle, high noise.
T_BANDS = ((0, 300), (300, 600), (600, 1000))
PROMPT, PLAIN = "a photo of S*", "a photo of a person"


def _latents(model, images: jax.Array) -> jax.Array:
    """Scaled posterior-mean latents of uint8 (or [0, 1]) images."""
    return model.vae.scale_latents(model.vae.encode(to_unit(images) * 2.0 - 1.0)[0])


def _prompt(tokenizer, n: int, words: int) -> tuple[jax.Array, jax.Array]:
    """Ids and slots of ``PROMPT`` for ``n`` images with ``words`` pseudo-words."""
    tokens = tokenizer([PROMPT] * n, words)
    return jnp.asarray(tokens.input_ids), jnp.asarray(tokens.slots)


def _shuffled(x: np.ndarray | jax.Array | None):
    """Photo i's shuffled counterpart is photo i+1's (a derangement); None stays None."""
    return None if x is None else np.roll(np.asarray(x), -1, axis=0)


def band_timesteps(
    band: tuple[int, int], photos: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """(draws, photos) timesteps in [lo, hi): each draw's photos share one stratum of the band
    (draws equal strata), jittered per photo, so every band is covered evenly."""
    lo, hi = band
    edges = np.linspace(lo, hi, draws + 1)
    t = edges[:-1, None] + rng.uniform(size=(draws, photos)) * np.diff(edges)[:, None]
    return np.clip(np.floor(t), lo, hi - 1).astype(np.int32)


def gap_summary(
    own: np.ndarray,
    shuffled: np.ndarray,
    base: np.ndarray | None = None,
    *,
    boot: int = 1000,
    seed: int = 0,
):
    """The relative gap (sum shuffled - sum own) / sum own of per-photo errors (photos,), with
    a 95% bootstrap interval over photos and the per-photo gaps' std; with the base's errors,
    also the base's mean and the own reference's gain over it, (base - own) / base."""
    own, shuffled = np.asarray(own, np.float64), np.asarray(shuffled, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(own), size=(boot, len(own)))
    lo, hi = np.percentile(shuffled[idx].sum(1) / own[idx].sum(1) - 1.0, [2.5, 97.5])
    out = {
        "gap": float(shuffled.sum() / own.sum() - 1.0),
        "ci95": [float(lo), float(hi)],
        "per_photo_std": float(np.std(shuffled / own - 1.0)),
        "own": float(own.mean()),
        "shuffled": float(shuffled.mean()),
    }
    if base is not None:
        out["base"] = float(np.mean(base))
        out["gain_over_base"] = float(1.0 - own.sum() / np.sum(base))
    return out


def make_x0_errors(
    graphdef: nnx.GraphDef,
    schedule,
    tokenizer,
    *,
    words: int,
    gamma: float,
    sigma: float,
    alpha: float = 1.0,
):
    """The jitted ``errors(state, images, own, shuffled, t, key[, own_desc, shuffled_desc]) ->
    (3, B)`` of :func:`x0_gap`: the per-photo x0 MSE of the single-step estimate with the own
    and the shuffled references (and their dlib descriptors, for identity tokens), and of the
    frozen base (no LoRA, no image branch) with ``PLAIN``, all on the same noise."""

    @jax.jit
    def errors(state, images, own, shuffled, t, key, own_desc=None, shuffled_desc=None):
        model = nnx.merge(graphdef, state)
        latents = _latents(model, images)
        x_t = add_noise(schedule, latents, jax.random.normal(key, latents.shape), t)
        ids, slots = _prompt(tokenizer, images.shape[0], words)

        def error(text, image_tokens, **weights):
            x0 = predict_x0(schedule, model.denoise(x_t, t, text, image_tokens, **weights), x_t, t)
            return jnp.mean(jnp.square(x0 - latents), axis=(1, 2, 3))

        rows = []
        for ref, desc in ((own, own_desc), (shuffled, shuffled_desc)):
            pseudo, image_tokens = model.encode_reference(ref, descriptors=desc)
            text = model.encode_text(ids, slots, pseudo)
            rows.append(error(text, image_tokens, gamma=gamma, sigma=sigma, alpha=alpha))
        plain = model.encode_plain(jnp.asarray(tokenizer.plain([PLAIN] * images.shape[0])))
        rows.append(error(plain, None, gamma=1.0, sigma=0.0, alpha=0.0))
        return jnp.stack(rows)

    return errors


def bundle_x0_errors(bundle):
    """:func:`make_x0_errors` for a bundle's model graph at its config's inference settings
    (m words, gamma, sigma): reused by every :func:`x0_gap` of that model's weights."""
    cfg = bundle.config
    return make_x0_errors(
        nnx.graphdef(bundle.model),
        bundle.schedule,
        bundle.tokenizer,
        words=cfg.words,
        gamma=cfg.gamma,
        sigma=cfg.sigma,
    )


def x0_gap(
    model,
    schedule,
    tokenizer,
    targets: np.ndarray,
    references: np.ndarray,
    *,
    gamma: float,
    sigma: float,
    alpha: float = 1.0,
    words: int | None = None,
    bands: tuple[tuple[int, int], ...] = T_BANDS,
    draws: int = 4,
    batch: int = 64,
    seed: int = 0,
    errors=None,
    descriptors: np.ndarray | None = None,
) -> dict:
    """Own vs shuffled reference: the relative x0-error gap per band of timesteps.

    ``targets`` (N, H, W, 3) and ``references`` (N, R, R, 3), uint8; the shuffled reference of
    photo i is photo i+1's. Each photo gets ``draws`` timesteps per band (one per stratum) and
    one noise per timestep, the same for both references and the frozen base. Returns, per band
    ``"lo-hi"``, :func:`gap_summary`'s fields. ``errors``: a :func:`make_x0_errors` function of
    this model's graph and these settings, to reuse its compilation across calls.
    ``descriptors`` (N, 128): the photos' dlib descriptors (shuffled with their references),
    for a model with identity tokens."""
    n = len(targets)
    if n < 2:
        raise ValueError(f"x0_gap needs at least 2 photos to shuffle references, got {n}")
    graphdef, state = nnx.split(model)
    if errors is None:
        words = words or model.config.words
        errors = make_x0_errors(
            graphdef, schedule, tokenizer, words=words, gamma=gamma, sigma=sigma, alpha=alpha
        )
    rng = np.random.default_rng(seed)
    refs = (references, _shuffled(references))
    descs = () if descriptors is None else (np.asarray(descriptors, np.float32),)
    descs += tuple(_shuffled(d) for d in descs)
    out = {}
    for bi, band in enumerate(bands):
        ts = band_timesteps(band, n, draws, rng)
        total = np.zeros((3, n))
        for d in range(draws):
            for s in range(0, n, batch):
                sl = slice(s, min(n, s + batch))
                key = jax.random.fold_in(jax.random.key(seed), (bi * draws + d) * n + s)
                arrays = (targets[sl], *(r[sl] for r in refs), ts[d, sl])
                e = errors(state, *map(jnp.asarray, arrays), key, *(x[sl] for x in descs))
                total[:, sl] += np.asarray(e)
        out[f"{band[0]}-{band[1]}"] = gap_summary(*(total / draws), seed=seed)
    return out


@nnx.jit
def _branches(model, ref, desc, x_t, ts, ids, slots, gamma, sigma) -> list:
    """Each PhotoVerse cross-attention layer's (O_T, O_S) in one forward, by graph order."""
    from pv_jax.photoverse.attention import PhotoVerseAttention

    def forward(model):
        pseudo, image_tokens = model.encode_reference(ref, descriptors=desc)
        text = model.encode_text(ids, slots, pseudo)
        model.denoise(x_t, ts, text, image_tokens, gamma=gamma, sigma=sigma)

    capture = nnx.capture(forward, nnx.Intermediate, method_outputs=nnx.Intermediate)
    outputs = dict(nnx.to_flat_state(capture(model)[1]))
    paths = [p for p, m in nnx.iter_modules(model.unet) if isinstance(m, PhotoVerseAttention)]
    return [outputs[("unet", *p, "branches")].get_value()[0] for p in paths]


def branch_outputs(
    model,
    schedule,
    tokenizer,
    targets: np.ndarray,
    references: np.ndarray,
    t: int,
    *,
    gamma: float,
    sigma: float,
    seed: int = 0,
    descriptors: np.ndarray | None = None,
) -> list[dict]:
    """Per cross-attention layer (graph order): how much of its output the image branch makes,
    and how much the reference changes it, at timestep ``t`` (``descriptors``: the photos' dlib
    descriptors, for identity tokens).

    ``image_share``: ||sigma O_S|| / (||gamma O_T|| + ||sigma O_S||); ``reference_effect``:
    ||O_S(own) - O_S(shuffled)|| / ||O_S(own)||, on the same x_t."""
    n, ts = len(targets), jnp.full((len(targets),), t)
    latents = _latents(model, targets)
    x_t = add_noise(schedule, latents, jax.random.normal(jax.random.key(seed), latents.shape), ts)
    gamma, sigma = float(gamma), float(sigma)  # one program for every value
    inputs = (x_t, ts, *_prompt(tokenizer, n, model.config.words), gamma, sigma)
    own = _branches(model, jnp.asarray(references), descriptors, *inputs)
    shuffled = _branches(model, jnp.asarray(_shuffled(references)), _shuffled(descriptors), *inputs)
    rows = []
    for (out_t, out_s), (_, out_s_shuffled) in zip(own, shuffled, strict=True):
        norm_t, norm_s = (
            float(jnp.linalg.norm(gamma * out_t)),
            float(jnp.linalg.norm(sigma * out_s)),
        )
        effect = jnp.linalg.norm(out_s - out_s_shuffled) / jnp.maximum(
            jnp.linalg.norm(out_s), 1e-12
        )
        rows.append(
            {
                "queries": int(out_s.shape[1]),
                "image_share": norm_s / max(norm_t + norm_s, 1e-12),
                "reference_effect": float(effect),
            }
        )
    return rows


def rollout_identity(
    model,
    schedule,
    tokenizer,
    arrays: dict[str, np.ndarray],
    *,
    t: int = 400,
    steps: int = 10,
    gamma: float = 1.0,
    sigma: float = 1.0,
    seed: int = 0,
) -> dict:
    """Identity kept through denoising, own vs shuffled reference: each target noised to ``t``
    and denoised by a ``steps``-step DDIM rollout (:func:`rollout_x0`), decoded, cut by the
    target's landmarks and compared with the target's dlib descriptor through the JAX face net
    (cosine; dlib also drives the face loss and the identity tokens). ``arrays``: targets,
    references, landmarks, descriptors (``split_arrays``); the model needs its face net."""
    from pv_jax.face import cosine_similarity
    from pv_jax.photoverse.losses import face_descriptors

    if model.face_net is None:
        raise ValueError("rollout_identity needs the model's face net (build with face_net=True)")
    n = len(arrays["target"])
    if n < 2:
        raise ValueError(f"rollout_identity needs at least 2 photos to shuffle, got {n}")
    ids, slots = _prompt(tokenizer, n, model.config.words)
    graphdef, state = nnx.split(model)
    target_desc = jnp.asarray(arrays["descriptor"], jnp.float32)

    @jax.jit
    def similarity(state, target, landmarks, target_desc, ref, desc):
        model = nnx.merge(graphdef, state)
        latents, tt = _latents(model, target), jnp.full((n,), t)
        noise = jax.random.normal(jax.random.key(seed), latents.shape)
        x_t = add_noise(schedule, latents, noise, tt)
        pseudo, image_tokens = model.encode_reference(ref, descriptors=desc)
        text = model.encode_text(ids, slots, pseudo)

        def predict(z, ts):
            return model.denoise(z, ts, text, image_tokens, gamma=gamma, sigma=sigma)

        x0 = rollout_x0(schedule, predict, predict(x_t, tt), x_t, tt, steps)
        found = face_descriptors(model, model.vae.decode_images(x0), landmarks)
        return cosine_similarity(found, target_desc)

    # The photos as arguments, not constants of the program.
    photos = (state, arrays["target"], arrays["landmarks"], target_desc)
    own = np.asarray(similarity(*photos, arrays["reference"], target_desc), np.float64)
    shuffled = similarity(*photos, _shuffled(arrays["reference"]), _shuffled(target_desc))
    diff = own - np.asarray(shuffled, np.float64)
    return {
        "t": t,
        "steps": steps,
        "photos": n,
        "own": float(own.mean()),
        "shuffled": float(np.mean(shuffled)),
        "gain": float(diff.mean()),
        "gain_se": float(diff.std(ddof=1) / np.sqrt(n)),
    }


def ridge_r2(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    lambdas=(1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3),
    folds: int = 5,
) -> tuple[float, float]:
    """Ridge regression's R^2 on the test set (features and targets standardised on the
    training set), its penalty chosen by ``folds``-fold cross-validation on the training set
    only; returns (R^2, lambda)."""

    def fit_predict(xa, ya, xb, lam):
        mx, sx = xa.mean(0), xa.std(0) + 1e-8
        a, b = (xa - mx) / sx, (xb - mx) / sx
        k = a @ a.T  # the dual form: features can outnumber photos
        w = np.linalg.solve(k + lam * a.shape[1] / 100.0 * np.eye(len(a)), ya - ya.mean(0))
        return b @ (a.T @ w) + ya.mean(0)

    def r2(y, pred):
        return 1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean(0)) ** 2)

    x_train, x_test, y_train, y_test = (
        a.astype(np.float64) for a in (x_train, x_test, y_train, y_test)
    )
    fold = np.arange(len(x_train)) % folds
    scores = {}
    for lam in lambdas:
        preds = np.zeros_like(y_train)
        for f in range(folds):
            preds[fold == f] = fit_predict(
                x_train[fold != f], y_train[fold != f], x_train[fold == f], lam
            )
        scores[lam] = r2(y_train, preds)
    lam = max(scores, key=scores.get)
    return float(r2(y_test, fit_predict(x_train, y_train, x_test, lam))), float(lam)


def encoder_probe(model, work: Path, *, pool: int = 4, train_count: int = 709) -> dict:
    """What the image encoder keeps (rung 1): ridge R^2 on the validation people from each
    input to the target's toy-VAE latent pooled to ``pool`` x ``pool``: the image branch's input
    (the configured hidden state, all tokens), the text branch's (CLS + mean patch of it), the
    masked reference's raw pixels at the encoder's size, and a random ViT of the same shape."""
    from pv_jax.models.clip import CLIPVisionModel, preprocess_images
    from pv_jax.models.presets import random_module
    from pv_jax.toy.data import split_arrays

    size = model.vae.config.downsample_factor * model.unet.config.sample_size
    vision, layer = model.image_encoder, model.config.image_layer
    random_vit = random_module(
        lambda r: CLIPVisionModel(vision.config, rngs=r), np.random.default_rng(0)
    )

    @jax.jit
    def features(images, targets):
        pixels = preprocess_images(images, vision.config.image_size)
        state = vision(pixels).hidden_states[layer]
        z = _latents(model, targets)
        b, h, w, c = z.shape
        return {
            "image branch input (all tokens)": state.reshape(b, -1),
            "text branch input (CLS + mean patch)": jnp.concatenate(
                [state[:, 0], state[:, 1:].mean(1)], -1
            ),
            "masked reference pixels": pixels.reshape(b, -1),
            "random ViT (all tokens)": random_vit(pixels).hidden_states[layer].reshape(b, -1),
            "_y": z.reshape(b, pool, h // pool, pool, w // pool, c).mean((2, 4)).reshape(b, -1),
        }

    def split_features(split: str, count: int) -> dict[str, np.ndarray]:
        data = split_arrays(work, split, size)
        parts = [
            jax.device_get(features(data["reference"][i : i + 64], data["target"][i : i + 64]))
            for i in range(0, min(count, len(data["target"])), 64)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    train, val = split_features("train", train_count), split_features("val", 10_000)
    out = {"pool": pool, "train_photos": len(train["_y"]), "val_photos": len(val["_y"])}
    for name in [k for k in train if k != "_y"]:
        r2, lam = ridge_r2(train[name], train["_y"], val[name], val["_y"])
        out[name] = {"val_r2": r2, "lambda": lam}
    return out


def trained_records(run_split: str, split: str) -> str:
    """The records of ``split`` to measure a run on: on ``train``, the part of the training set
    the run's ``data.split`` read (``train[:177]`` for a run on 177 people), else all."""
    return run_split if split == "train" else "train"


def _split_of(bundle, work: Path, split: str, count: int | None = None) -> dict[str, np.ndarray]:
    """The first ``count`` photos of ``split`` at the bundle's resolution (on ``train``, those
    the run trained on)."""
    from pv_jax.toy.data import split_arrays

    size = bundle.model.vae.config.downsample_factor * bundle.model.unet.config.sample_size
    records = trained_records(bundle.source["data_split"], split)
    return {k: v[:count] for k, v in split_arrays(work, split, size, records).items()}


def x0_gap_curve(
    run: Path,
    work: Path,
    split: str = "val",
    *,
    steps: list[int] | None = None,
    count: int = 64,
    draws: int = 4,
) -> list[dict]:
    """:func:`x0_gap` of a training run at each checkpoint ``steps`` (default: every one kept),
    on up to ``count`` photos of ``split``, at the run's own inference gamma / sigma: the curve
    of the conditioning gain against steps. The model is built once; each step restores only
    the trained weights (EMA when kept)."""
    from pv_jax.photoverse import split_trainable
    from pv_jax.run_checkpoint import Checkpointer, load_trained

    ckpt = Checkpointer(run, every=1, keep=1_000_000)
    try:
        kept = sorted(ckpt.manager.all_steps())
        steps = kept if steps is None else steps
        missing = sorted(set(steps) - set(kept))
        if missing:
            raise ValueError(f"{run} has no checkpoint at steps {missing}; it has {kept}")
        bundle = load_trained(run, step=steps[0])
        cfg = bundle.config
        data = _split_of(bundle, work, split, count)
        graphdef, trainable, frozen = split_trainable(bundle.model)
        errors = bundle_x0_errors(bundle)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        rows = []
        for step in steps:
            weights, which = ckpt.restore_weights(
                step, trainable, jax.tree.map(lambda _: one, trainable)
            )
            gap = x0_gap(
                nnx.merge(graphdef, weights, frozen),
                bundle.schedule,
                bundle.tokenizer,
                data["target"],
                data["reference"],
                gamma=cfg.gamma,
                sigma=cfg.sigma,
                draws=draws,
                errors=errors,
                descriptors=data["descriptor"] if cfg.uses_identity else None,
            )
            photos = len(data["reference"])
            rows.append(
                {"step": step, "weights": which, "split": split, "photos": photos, "x0_gap": gap}
            )
            print(
                f"step {step}: " + " ".join(f"{k} {v['gap'] * 100:+.1f}%" for k, v in gap.items())
            )
    finally:
        ckpt.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m pv_jax.toy.diagnose --run DIR [--step N] [--split val]``: the x0 gap at
    every checkpoint (or ``--step``); ``--identity``: the identity a rollout keeps; ``--probe``:
    what the image encoder keeps. Prints each result and appends it to ``--into`` (JSON lines)."""
    import argparse
    import json

    from pv_jax.run_checkpoint import load_trained

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.diagnose")
    p.add_argument("--run", type=Path, required=True, help="a train_tpu.py workdir")
    p.add_argument("--step", type=int, help="checkpoint step (default: every one; else the latest)")
    p.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--into", type=Path, help="a JSON-lines file collecting the results")
    p.add_argument("--x0-gap", action="store_true", help="the default: the x0 gap per band")
    p.add_argument("--count", type=int, default=64, help="photos of the split")
    p.add_argument("--probe", action="store_true", help="what the image encoder keeps (ridge R^2)")
    p.add_argument(
        "--identity",
        action="store_true",
        help="dlib identity kept by a 10-step rollout from --t, own vs shuffled reference",
    )
    p.add_argument("--t", type=int, default=400, help="--identity: the rollout's start")
    args = p.parse_args(argv)
    if args.identity:
        from pv_jax.face import load_dlib_face_net

        bundle = load_trained(args.run, step=args.step)
        bundle.model.face_net = nnx.data(load_dlib_face_net())  # None when loaded: static
        cfg = bundle.config
        data = _split_of(bundle, args.work, args.split, args.count)
        r = rollout_identity(
            bundle.model,
            bundle.schedule,
            bundle.tokenizer,
            data,
            t=args.t,
            gamma=cfg.gamma,
            sigma=cfg.sigma,
        )
        rows = [dict(run=str(args.run), step=args.step, split=args.split, **r)]
    elif args.probe:
        r = encoder_probe(load_trained(args.run, step=args.step).model, args.work)
        rows = [dict(run=str(args.run), step=args.step, probe=r)]
    else:
        steps = None if args.step is None else [args.step]
        curve = x0_gap_curve(args.run, args.work, args.split, steps=steps, count=args.count)
        rows = [dict(r, run=str(args.run)) for r in curve]
    for r in rows:
        print(json.dumps(r))
    if args.into:
        with args.into.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
