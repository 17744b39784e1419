"""Does a PhotoVerse run use its reference? The conditioning gain of the diffusion loss.

:func:`x0_gap` is the measure to read first: the relative gap in x0 error between a shuffled
and the own reference, per band of timesteps, on the same noise, with a bootstrap interval over
photos. Epsilon MSE is SNR x x0-MSE, so it hides high noise, where a reference matters most;
the x0 error weighs every timestep of a band by what the model gets wrong about the image.

For photos of a split, the epsilon MSE of the trained model at fixed timesteps, with the same
noise, under four conditionings: the photo's own reference (what training sees), another
photo's reference (shuffled), the image branch only / text branch only with the own reference,
and the frozen base with the plain caption "a photo of a person" (no PhotoVerse). A model
that carries identity from the reference predicts the noise better with its own reference than
with someone else's; equal losses mean the reference is ignored, whatever the loss curve says.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TIMESTEPS = (100, 300, 500, 700, 900)
# Bands of the x0 gap: low, middle, high noise.
T_BANDS = ((0, 300), (300, 600), (600, 1000))


# name -> (reference, prompt, gamma, sigma, alpha); prompt "S*" is "a photo of S*" with the
# pseudo-words, "plain" "a photo of a person", "empty" the guidance's unconditional prompt;
# gamma/sigma None: the run's own inference setting (its config's; sigma 0 without image branch).
CONDITIONINGS = {
    "own reference": ("own", "S*", None, None, 1.0),
    "shuffled reference": ("shuffled", "S*", None, None, 1.0),
    "own, image branch only (sigma 2)": ("own", "S*", 0.0, 2.0, 1.0),
    "own, text branch only (gamma 2)": ("own", "S*", 2.0, 0.0, 1.0),
    "base, plain caption": ("own", "plain", 1.0, 0.0, 0.0),
    "uncond: empty, LoRA, text weight 1": ("own", "empty", 1.0, 0.0, 1.0),
    "uncond: empty, LoRA, text weight 2": ("own", "empty", 2.0, 0.0, 1.0),
    "uncond: empty, frozen base": ("own", "empty", 1.0, 0.0, 0.0),
}


def conditioning_gain(
    bundle, work: Path, split: str = "val", *, count: int = 32, seed: int = 0
) -> dict:
    """Epsilon MSE per conditioning (``CONDITIONINGS``) and timestep of a trained PhotoVerse
    bundle (``load_trained``; a pipeline's ``.bundle``), the mean over ``count`` photos of
    ``split``, with the same noise for every conditioning."""
    from pv_jax.diffusion import add_noise
    from pv_jax.photoverse.losses import to_unit
    from pv_jax.toy.data import split_arrays

    model, cfg = bundle.model, bundle.config
    size = model.vae.config.downsample_factor * model.unet.config.sample_size
    data = split_arrays(work, split, size)
    n = min(count, len(data["target"]))
    idx = np.random.default_rng(seed).permutation(len(data["target"]))[:n]
    refs = {"own": data["reference"][idx], "shuffled": data["reference"][np.roll(idx, 1)]}
    target = to_unit(jnp.asarray(data["target"][idx]))
    tokens = bundle.tokenizer(["a photo of S*"] * n, cfg.words)
    plain = {
        k: bundle.tokenizer.plain([p] * n)
        for k, p in [("plain", "a photo of a person"), ("empty", "")]
    }

    graphdef, state = nnx.split(model)  # weights as arguments, not constants of the program

    @functools.partial(jax.jit, static_argnames="prompt")
    def mse(state, ref, t, key, prompt, gamma, sigma, alpha):
        model = nnx.merge(graphdef, state)
        latents = model.vae.scale_latents(model.vae.encode(target * 2.0 - 1.0)[0])
        noise = jax.random.normal(key, latents.shape)
        x_t = add_noise(bundle.schedule, latents, noise, jnp.full((n,), t))
        words, image_tokens = model.encode_reference(ref)
        if prompt == "S*":
            ctx = model.encode_text(tokens.input_ids, tokens.slots, words)
        else:
            ctx = model.encode_plain(plain[prompt])
        pred = model.denoise(
            x_t, jnp.full((n,), t), ctx, image_tokens, gamma=gamma, sigma=sigma, alpha=alpha
        )
        return jnp.mean((pred - noise) ** 2)

    out = {}
    for name, (ref, prompt, gamma, sigma, alpha) in CONDITIONINGS.items():
        gamma = cfg.gamma if gamma is None else gamma
        sigma = cfg.sigma if sigma is None else sigma
        out[name] = {
            int(t): float(
                mse(
                    state,
                    jnp.asarray(refs[ref]),
                    t,
                    jax.random.key(seed + i),
                    prompt,
                    gamma,
                    sigma,
                    alpha,
                )
            )
            for i, t in enumerate(TIMESTEPS)
        }
    return {"split": split, "photos": n, "mse": out}


def x0_errors(
    model,
    schedule,
    latents: jax.Array,
    references: tuple[jax.Array, ...],
    input_ids: jax.Array,
    slots: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    gamma: float,
    sigma: float,
    alpha: float = 1.0,
    plain_ids: jax.Array | None = None,
    descriptors: tuple[jax.Array | None, ...] | None = None,
) -> jax.Array:
    """Per-sample x0 MSE (rows, B) of the model's single-step estimate from
    ``x_t = add_noise(latents, noise, t)``, one row per reference batch, on the same noise; with
    ``plain_ids`` a last row for the frozen base (no LoRA, no image branch) with that caption.
    ``descriptors``: each reference batch's dlib descriptors (identity tokens)."""
    from pv_jax.diffusion import add_noise, predict_x0

    x_t = add_noise(schedule, latents, noise, t)

    def error(pred):
        x0 = predict_x0(schedule, pred, x_t, t)
        return jnp.mean(jnp.square(x0 - latents), axis=(1, 2, 3))

    rows = []
    for ref, desc in zip(references, descriptors or (None,) * len(references), strict=True):
        words, image_tokens = model.encode_reference(ref, descriptors=desc)
        text = model.encode_text(input_ids, slots, words)
        rows.append(
            error(model.denoise(x_t, t, text, image_tokens, gamma=gamma, sigma=sigma, alpha=alpha))
        )
    if plain_ids is not None:
        text = model.encode_plain(plain_ids)
        rows.append(error(model.denoise(x_t, t, text, None, gamma=1.0, sigma=0.0, alpha=0.0)))
    return jnp.stack(rows)


def band_timesteps(
    band: tuple[int, int], photos: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """(draws, photos) timesteps in [lo, hi): each draw's photos share one stratum of the band
    (draws equal strata), jittered per photo, so every band is covered evenly."""
    lo, hi = band
    edges = np.linspace(lo, hi, draws + 1)
    u = rng.uniform(size=(draws, photos))
    t = edges[:-1, None] + u * (edges[1:] - edges[:-1])[:, None]
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
    gap = float(shuffled.sum() / own.sum() - 1.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(own), size=(boot, len(own)))
    boots = shuffled[idx].sum(1) / own[idx].sum(1) - 1.0
    lo, hi = np.percentile(boots, [2.5, 97.5])
    out = {
        "gap": gap,
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
    (3, B)`` of :func:`x0_gap`: x0 MSE with the own and the shuffled references (and their dlib
    descriptors, for identity tokens) and of the frozen base with the plain caption, on the same
    noise (compiled once)."""
    from pv_jax.photoverse.losses import to_unit

    @jax.jit
    def errors(state, images, own, shuffled, t, key, own_desc=None, shuffled_desc=None):
        model = nnx.merge(graphdef, state)
        latents = model.vae.scale_latents(model.vae.encode(to_unit(images) * 2.0 - 1.0)[0])
        noise = jax.random.normal(key, latents.shape)
        b = images.shape[0]
        tokens = tokenizer(["a photo of S*"] * b, words)
        return x0_errors(
            model,
            schedule,
            latents,
            (own, shuffled),
            jnp.asarray(tokens.input_ids),
            jnp.asarray(tokens.slots),
            t,
            noise,
            gamma=gamma,
            sigma=sigma,
            alpha=alpha,
            plain_ids=jnp.asarray(tokenizer.plain(["a photo of a person"] * b)),
            descriptors=(own_desc, shuffled_desc),
        )

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
    photo i is photo i+1's (a derangement). Each photo gets ``draws`` timesteps per band (one per
    stratum) and one noise per timestep, the same for both references and the frozen base
    ("a photo of a person"). Returns, per band ``"lo-hi"``, :func:`gap_summary`'s fields.
    ``errors``: a :func:`make_x0_errors` function of this model's graph and these settings, to
    reuse its compilation across calls. ``descriptors`` (N, 128): the photos' dlib descriptors
    (shuffled with their references), for a model with identity tokens."""
    n = len(targets)
    if n < 2:
        raise ValueError(f"x0_gap needs at least 2 photos to shuffle references, got {n}")
    graphdef, state = nnx.split(model)
    if errors is None:
        errors = make_x0_errors(
            graphdef,
            schedule,
            tokenizer,
            words=words or model.config.words,
            gamma=gamma,
            sigma=sigma,
            alpha=alpha,
        )
    rng = np.random.default_rng(seed)
    shuffled_refs = np.roll(references, -1, axis=0)
    descs = None
    if descriptors is not None:
        descs = (np.asarray(descriptors, np.float32), np.roll(descriptors, -1, axis=0))
    out = {}
    for bi, band in enumerate(bands):
        ts = band_timesteps(band, n, draws, rng)
        total = np.zeros((3, n))
        for d in range(draws):
            for s in range(0, n, batch):
                sl = slice(s, min(n, s + batch))
                key = jax.random.fold_in(jax.random.key(seed), (bi * draws + d) * n + s)
                e = errors(
                    state,
                    jnp.asarray(targets[sl]),
                    jnp.asarray(references[sl]),
                    jnp.asarray(shuffled_refs[sl]),
                    jnp.asarray(ts[d, sl]),
                    key,
                    *(
                        ()
                        if descs is None
                        else (jnp.asarray(descs[0][sl]), jnp.asarray(descs[1][sl]))
                    ),
                )
                total[:, sl] += np.asarray(e)
        out[f"{band[0]}-{band[1]}"] = gap_summary(*(total / draws), seed=seed)
    return out


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
    and how much the reference changes it, at timestep ``t`` (run eagerly: it reads every
    layer's two branches; ``descriptors``: the photos' dlib descriptors, for identity tokens).

    ``image_share``: ||sigma O_S|| / (||gamma O_T|| + ||sigma O_S||); ``reference_effect``:
    ||O_S(own) - O_S(shuffled)|| / ||O_S(own)||, on the same x_t."""
    from pv_jax.diffusion import add_noise
    from pv_jax.photoverse.attention import PhotoVerseAttention
    from pv_jax.photoverse.losses import to_unit

    n = len(targets)
    latents = model.vae.scale_latents(model.vae.encode(to_unit(targets) * 2.0 - 1.0)[0])
    noise = jax.random.normal(jax.random.key(seed), latents.shape)
    x_t = add_noise(schedule, latents, noise, jnp.full((n,), t))
    tokens = tokenizer(["a photo of S*"] * n, model.config.words)
    ids, slots = jnp.asarray(tokens.input_ids), jnp.asarray(tokens.slots)
    # Each cross-attention layer's two branches (PhotoVerseAttention.branches), by its path.
    paths = [p for p, m in nnx.iter_modules(model.unet) if isinstance(m, PhotoVerseAttention)]

    def forward(model, ref, desc):
        words, image_tokens = model.encode_reference(jnp.asarray(ref), descriptors=desc)
        text = model.encode_text(ids, slots, words)
        model.denoise(x_t, jnp.full((n,), t), text, image_tokens, gamma=gamma, sigma=sigma)

    capture = nnx.capture(forward, nnx.Intermediate, method_outputs=nnx.Intermediate)
    runs = []
    pairs = [(references, descriptors)]
    pairs.append(
        (
            np.roll(references, -1, axis=0),
            None if descriptors is None else np.roll(descriptors, -1, axis=0),
        )
    )
    for ref, desc in pairs:
        _, inter = capture(model, ref, desc)
        outputs = dict(nnx.to_flat_state(inter))
        runs.append([outputs[("unet", *p, "branches")].get_value()[0] for p in paths])
    rows = []
    for (out_t, out_s), (_, out_s_shuffled) in zip(*runs, strict=True):
        norm_t, norm_s = (
            float(jnp.linalg.norm(gamma * out_t)),
            float(jnp.linalg.norm(sigma * out_s)),
        )
        rows.append(
            {
                "queries": int(out_s.shape[1]),
                "image_share": norm_s / max(norm_t + norm_s, 1e-12),
                "reference_effect": float(
                    jnp.linalg.norm(out_s - out_s_shuffled)
                    / jnp.maximum(jnp.linalg.norm(out_s), 1e-12)
                ),
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
    from pv_jax.diffusion import add_noise, rollout_x0
    from pv_jax.face import cosine_similarity
    from pv_jax.photoverse.losses import face_descriptors, to_unit

    if model.face_net is None:
        raise ValueError("rollout_identity needs the model's face net (build with face_net=True)")
    n = len(arrays["target"])
    if n < 2:
        raise ValueError(f"rollout_identity needs at least 2 photos to shuffle, got {n}")
    tokens = tokenizer(["a photo of S*"] * n, model.config.words)
    ids, slots = jnp.asarray(tokens.input_ids), jnp.asarray(tokens.slots)
    graphdef, state = nnx.split(model)

    @jax.jit
    def similarity(state, target, ref, desc, landmarks, target_desc, key):
        model = nnx.merge(graphdef, state)
        x = to_unit(target)
        latents = model.vae.scale_latents(model.vae.encode(x * 2.0 - 1.0)[0])
        tt = jnp.full((n,), t)
        x_t = add_noise(schedule, latents, jax.random.normal(key, latents.shape), tt)
        words, image_tokens = model.encode_reference(ref, descriptors=desc)
        text = model.encode_text(ids, slots, words)

        def predict(z, ts):
            return model.denoise(z, ts, text, image_tokens, gamma=gamma, sigma=sigma)

        x0 = rollout_x0(schedule, predict, predict(x_t, tt), x_t, tt, steps)
        images = jnp.clip(model.vae.decode(model.vae.unscale_latents(x0)) / 2 + 0.5, 0.0, 1.0)
        return cosine_similarity(face_descriptors(model, images, landmarks), target_desc)

    desc = jnp.asarray(arrays["descriptor"], jnp.float32)
    args = (jnp.asarray(arrays["landmarks"]), desc, jax.random.key(seed))
    own = similarity(state, arrays["target"], arrays["reference"], desc, *args)
    shuffled = similarity(
        state,
        arrays["target"],
        np.roll(arrays["reference"], -1, axis=0),
        jnp.roll(desc, -1, axis=0),
        *args,
    )
    own, shuffled = np.asarray(own, np.float64), np.asarray(shuffled, np.float64)
    diff = own - shuffled
    return {
        "t": t,
        "steps": steps,
        "photos": n,
        "own": float(own.mean()),
        "shuffled": float(shuffled.mean()),
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
        my = ya.mean(0)
        a, b = (xa - mx) / sx, (xb - mx) / sx
        k = a @ a.T  # the dual form: features can outnumber photos
        w = np.linalg.solve(k + lam * a.shape[1] / 100.0 * np.eye(len(a)), ya - my)
        return b @ (a.T @ w) + my

    def r2(y, pred):
        return 1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean(0)) ** 2)

    x_train, x_test = x_train.astype(np.float64), x_test.astype(np.float64)
    y_train, y_test = y_train.astype(np.float64), y_test.astype(np.float64)
    idx = np.arange(len(x_train)) % folds
    scores = {}
    for lam in lambdas:
        preds = np.zeros_like(y_train)
        for f in range(folds):
            tr, te = idx != f, idx == f
            preds[te] = fit_predict(x_train[tr], y_train[tr], x_train[te], lam)
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
    from pv_jax.photoverse.losses import to_unit
    from pv_jax.toy.data import split_arrays

    size = model.vae.config.downsample_factor * model.unet.config.sample_size
    vision = model.image_encoder
    layer = model.config.image_layer
    random_vit = random_module(
        lambda r: CLIPVisionModel(vision.config, rngs=r), np.random.default_rng(0)
    )

    @jax.jit
    def features(images, targets):
        pixels = preprocess_images(images, vision.config.image_size)
        state = vision(pixels).hidden_states[layer]
        rand = random_vit(pixels).hidden_states[layer]
        z = model.vae.scale_latents(model.vae.encode(to_unit(targets) * 2.0 - 1.0)[0])
        b, h, w, c = z.shape
        pooled = z.reshape(b, pool, h // pool, pool, w // pool, c).mean((2, 4))
        return {
            "image branch input (all tokens)": state.reshape(b, -1),
            "text branch input (CLS + mean patch)": jnp.concatenate(
                [state[:, 0], state[:, 1:].mean(1)], -1
            ),
            "masked reference pixels": pixels.reshape(b, -1),
            "random ViT (all tokens)": rand.reshape(b, -1),
            "_y": pooled.reshape(b, -1),
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
    for name in train:
        if name != "_y":
            r2, lam = ridge_r2(train[name], train["_y"], val[name], val["_y"])
            out[name] = {"val_r2": r2, "lambda": lam}
    return out


def trained_records(run_split: str, split: str) -> str:
    """The records of ``split`` to measure a run on: on ``train``, the part of the training set
    the run's ``data.split`` read (``train[:177]`` for a run on 177 people), else all."""
    return run_split if split == "train" else "train"


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
    from pv_jax.toy.data import split_arrays

    ckpt = Checkpointer(run, every=1, keep=1_000_000)
    try:
        kept = sorted(ckpt.manager.all_steps())
        steps = kept if steps is None else steps
        missing = sorted(set(steps) - set(kept))
        if missing:
            raise ValueError(f"{run} has no checkpoint at steps {missing}; it has {kept}")
        bundle = load_trained(run, step=steps[0])
        cfg, model = bundle.config, bundle.model
        size = model.vae.config.downsample_factor * model.unet.config.sample_size
        data = split_arrays(work, split, size, trained_records(bundle.source["data_split"], split))
        targets, refs = data["target"][:count], data["reference"][:count]
        descs = data["descriptor"][:count] if cfg.uses_identity else None
        graphdef, trainable, frozen = split_trainable(model)
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
                targets,
                refs,
                gamma=cfg.gamma,
                sigma=cfg.sigma,
                draws=draws,
                errors=errors,
                descriptors=descs,
            )
            rows.append(
                {"step": step, "weights": which, "split": split, "photos": len(refs), "x0_gap": gap}
            )
            print(
                f"step {step}: " + " ".join(f"{k} {v['gap'] * 100:+.1f}%" for k, v in gap.items())
            )
    finally:
        ckpt.close()
    return rows


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.toy.diagnose --run DIR [--step N] --split train``: print the table
    and add it to ``--into`` (a JSON list); ``--x0-gap``: the x0 gap at every checkpoint."""
    import argparse
    import json

    from pv_jax.run_checkpoint import load_trained

    p = argparse.ArgumentParser(prog="python -m pv_jax.toy.diagnose")
    p.add_argument("--run", type=Path, required=True, help="a train_tpu.py workdir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--split", default="val", choices=("train", "val", "heldout"))
    p.add_argument("--work", type=Path, default=Path("toy_work"))
    p.add_argument("--into", type=Path, help="a JSON file collecting the results")
    p.add_argument(
        "--x0-gap", action="store_true", help="own vs shuffled x0 gap per band at each checkpoint"
    )
    p.add_argument("--count", type=int, default=64, help="--x0-gap: photos of the split")
    p.add_argument(
        "--probe", action="store_true", help="what the run's image encoder keeps (ridge R^2)"
    )
    p.add_argument(
        "--identity",
        action="store_true",
        help="dlib identity kept by a 10-step rollout from --t, own vs shuffled reference",
    )
    p.add_argument("--t", type=int, default=400, help="--identity: the rollout's start")
    args = p.parse_args(argv)
    if args.identity:
        from pv_jax.face import load_dlib_face_net
        from pv_jax.toy.data import split_arrays

        bundle = load_trained(args.run, step=args.step)
        bundle.model.face_net = nnx.data(load_dlib_face_net())  # None when loaded: static
        size = bundle.model.vae.config.downsample_factor * bundle.model.unet.config.sample_size
        records = trained_records(bundle.source["data_split"], args.split)
        data = split_arrays(args.work, args.split, size, records)
        r = rollout_identity(
            bundle.model,
            bundle.schedule,
            bundle.tokenizer,
            {k: v[: args.count] for k, v in data.items()},
            t=args.t,
            gamma=bundle.config.gamma,
            sigma=bundle.config.sigma,
        )
        r = dict(run=str(args.run), step=args.step, split=args.split, **r)
        print(json.dumps(r))
        if args.into:
            with args.into.open("a") as f:
                f.write(json.dumps(r) + "\n")
        return r
    if args.probe:
        r = encoder_probe(load_trained(args.run, step=args.step).model, args.work)
        print(json.dumps(r, indent=1))
        if args.into:
            args.into.write_text(json.dumps(r, indent=1))
        return r
    if args.x0_gap:
        rows = x0_gap_curve(
            args.run,
            args.work,
            args.split,
            steps=None if args.step is None else [args.step],
            count=args.count,
        )
        if args.into:
            with args.into.open("a") as f:
                f.writelines(json.dumps(dict(r, run=str(args.run))) + "\n" for r in rows)
        return {"curve": rows}
    bundle = load_trained(args.run, step=args.step)
    r = dict(run=str(args.run), step=args.step, **conditioning_gain(bundle, args.work, args.split))
    for name, row in r["mse"].items():
        print(f"{name:38s}", " ".join(f"{v:.4f}" for v in row.values()))
    if args.into:
        rows = json.loads(args.into.read_text()) if args.into.is_file() else []
        args.into.write_text(json.dumps(rows + [r], indent=1))
    return r


if __name__ == "__main__":
    main()
