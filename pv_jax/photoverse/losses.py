"""PhotoVerse's training objective (SPEC.md):

    L = L_diff + w_face L_face + w_treg L_Treg + w_sreg L_Sreg     (0.01 / 0.01 / 0.001)

- L_diff: MSE between the UNet's prediction and its target (noise, or v).
- L_face: 1 - cos(F(face(x0_hat)), F(face(x))) on samples with t <= t_face_max, where x0_hat is
  the single-step clean-latent estimate (``face_rollout_steps`` > 1: a short DDIM rollout's)
  decoded by the frozen VAE, face() the dlib chip cut by
  the target's 5 landmarks (differentiable) and F the dlib face net. Only a sub-batch is
  decoded (``face_batch_fraction``: the samples of smallest t, as many as the paper's expected
  share; t is drawn stratified so that the face-range samples fit it), and, as an option, only a
  latent window around each face (``face_window``; see docs/BENCHMARKS.md for its cost/fidelity).
- L_Treg = mean |S1..Sm|; L_Sreg = mean |V_S| (see :meth:`PhotoVerse.image_value_l1`).

A batch is a dict of arrays:
    reference  (B, R, R, 3)  masked reference face, uint8 or [0, 1]
    target     (B, H, W, 3)  diffusion target image, uint8 or [0, 1]
    landmarks  (B, 5, 2)     dlib's 5 landmarks (x, y) in target pixels
    input_ids, slots (B, L)  placeholder prompts (PlaceholderTokenizer)
    input_ids_2 (B, L)       SDXL: the prompts' ids for text tower 2
    time_ids   (B, 6)        SDXL: optional micro-conditioning (original size, crop, target
                             size; else the target's size, uncropped)
    descriptor (B, 128)      optional: the target's face descriptor (else computed with F); the
                             face loss's target and, with identity tokens, their input
    timesteps  (B,)          optional: fixed diffusion timesteps (else drawn uniformly)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pv_jax.diffusion import NoiseSchedule, add_noise, rollout_x0, training_target
from pv_jax.face import align_faces, identity_loss
from pv_jax.face.align import chip_support, default_pyramid_levels
from pv_jax.photoverse.attention import random_fusion
from pv_jax.photoverse.config import PhotoVerseConfig
from pv_jax.photoverse.model import PhotoVerse


def to_unit(images: jax.Array) -> jax.Array:
    """uint8 (0..255) or float [0, 1] images -> float32 [0, 1]."""
    x = jnp.asarray(images)
    return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def diffusion_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """L_diff: mean squared error over every latent element."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


def text_reg_loss(words: jax.Array) -> jax.Array:
    """L_Treg: mean absolute value of the pseudo-words (B, m, D)."""
    return jnp.mean(jnp.abs(words))


def face_descriptors(model: PhotoVerse, images01: jax.Array, landmarks: jax.Array) -> jax.Array:
    """dlib descriptors (B, 128) of the faces in [0, 1] images, cut by their 5 landmarks."""
    chips = align_faces(images01 * 255.0, landmarks, quantize=False)
    return model.face_net(chips)


def face_subset_size(
    batch: int, config: PhotoVerseConfig, num_train_timesteps: int, shards: int = 1
) -> int:
    """How many samples the face loss decodes: round(B * fraction), at least 1, at most B, and
    rounded up to a multiple of ``shards`` (the devices the batch is split over, when they
    divide B) so that every device decodes the same share. An uneven sub-batch cannot be
    sharded, and XLA then has every device decode all of it; the few extra samples (the next
    smallest t) cost less, and the face-range mask still decides which ones count."""
    fraction = config.face_batch_fraction
    if fraction is None:
        fraction = face_share(config, num_train_timesteps)
    n = int(min(batch, max(1, round(batch * fraction))))
    if shards > 1 and batch % shards == 0:
        n = min(batch, -(-n // shards) * shards)
    return n


def face_share(config: PhotoVerseConfig, num_train_timesteps: int) -> float:
    """P(t <= t_face_max) for t uniform in [0, T): the paper's expected face-loss share."""
    return min(1.0, (config.t_face_max + 1) / num_train_timesteps)


def draw_timesteps(
    key: jax.Array, batch: int, num_train_timesteps: int, config: PhotoVerseConfig
) -> jax.Array:
    """(B,) timesteps, each uniform in [0, T), with a stratified count of face-loss samples.

    The number of samples with t <= t_face_max is floor(B p) or floor(B p) + 1 (p the uniform
    share, with mean B p), the samples chosen at random: every t keeps its uniform marginal
    while the count stays within the face sub-batch of :func:`face_subset_size`.
    """
    low = min(config.t_face_max + 1, num_train_timesteps)
    if low >= num_train_timesteps:
        return jax.random.randint(key, (batch,), 0, num_train_timesteps)
    k_count, k_low, k_high, k_perm = jax.random.split(key, 4)
    expected = batch * low / num_train_timesteps
    count = int(expected) + (jax.random.uniform(k_count) < expected - int(expected))
    is_low = jax.random.permutation(k_perm, batch) < count
    t_low = jax.random.randint(k_low, (batch,), 0, low)
    t_high = jax.random.randint(k_high, (batch,), low, num_train_timesteps)
    return jnp.where(is_low, t_low, t_high)


def latent_window_origin(
    landmarks: jax.Array, latent_hw: tuple[int, int], window: int, factor: int
) -> jax.Array:
    """(B, 2) int32 (x, y) latent origin of the ``window`` square centred on each face's chip."""
    h, w = latent_hw
    support = chip_support(landmarks, (h * factor, w * factor))
    centre = (support[..., :2] + support[..., 2:]) / 2.0 / factor
    origin = jnp.round(centre - window / 2.0).astype(jnp.int32)
    return jnp.clip(origin, 0, jnp.asarray([w - window, h - window], jnp.int32))


def decode_face_windows(
    model: PhotoVerse, x0: jax.Array, landmarks: jax.Array, window: int, factor: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode a latent window around each face: ([0, 1] images, shifted landmarks, fits).

    ``fits`` (B,) says whether the pixels the face chip reads lie inside the decoded window.
    """
    b, h, w, c = x0.shape
    origin = latent_window_origin(landmarks, (h, w), window, factor)
    crops = jax.vmap(lambda z, o: jax.lax.dynamic_slice(z, (o[1], o[0], 0), (window, window, c)))(
        x0, origin
    )
    images = model.vae.decode_images(crops)
    offset = (origin * factor).astype(jnp.float32)[:, None, :]
    support = chip_support(landmarks, (h * factor, w * factor)) - jnp.tile(offset[:, 0], 2)
    side = window * factor
    fits = jnp.all((support[:, :2] >= 0) & (support[:, 2:] <= side - 1), axis=-1)
    return images, landmarks - offset, fits


def face_loss(
    model: PhotoVerse,
    schedule: NoiseSchedule,
    prediction: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    landmarks: jax.Array,
    target_descriptor: jax.Array,
    mask: jax.Array,
    *,
    image_hw: tuple[int, int],
    subset: int | None = None,
    window: float = 1.0,
    sub_batch_sharding: jax.sharding.Sharding | None = None,
    rollout_steps: int = 1,
    predict: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array] | None = None,
    count: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """L_face on the samples selected by ``mask``, and the share of their chips in the window.

    ``subset``: decode only this many samples, those of smallest t (None: all). ``window``:
    decode a square latent window of this fraction of the latent side around each face (1.0:
    the whole image). ``rollout_steps`` > 1: x0 by that many DDIM steps from x_t
    (:func:`rollout_x0`), ``predict(x, t, idx)`` making the model's later predictions for the
    samples ``idx`` of the batch (None: all). ``count``: the divisor of the masked sum (a whole
    batch's selected samples, for a microbatch; None: this mask's). 0, with zero gradients and
    a window share of 1, when no sample is selected.
    """
    if rollout_steps > 1 and predict is None:
        raise ValueError("face_loss with rollout_steps > 1 needs predict(x, t, idx)")
    idx = None
    b, h, w, _ = x_t.shape
    factor = image_hw[0] // h
    if subset is not None and subset < b:
        idx = jnp.argsort(t, stable=True)[:subset]
        parts = (prediction, x_t, t, landmarks, target_descriptor, mask)
        parts = tuple(jnp.take(x, idx, axis=0) for x in parts)
        if sub_batch_sharding is not None:
            parts = jax.lax.with_sharding_constraint(parts, sub_batch_sharding)
        prediction, x_t, t, landmarks, target_descriptor, mask = parts
    side = min(h, w)
    win = min(side, max(1, math.ceil(window * side)))

    x0 = rollout_x0(schedule, lambda x, tt: predict(x, tt, idx), prediction, x_t, t, rollout_steps)
    if window < 1.0 and win < side:
        images, lms, fits = decode_face_windows(model, x0, landmarks, win, factor)
    else:
        images, lms = model.vae.decode_images(x0), landmarks
        fits = jnp.ones(mask.shape, bool)
    chips = align_faces(
        images * 255.0,
        lms,
        quantize=False,
        pyramid_levels=default_pyramid_levels(*image_hw),
    )
    # Computed whether or not a sample is selected: with none, the masked identity loss is 0
    # with zero gradients. (Behind a lax.cond the branch's backward ran 40x slower on XLA's CPU
    # backend at optimisation level 0 and 3.6x at its default level; with B p >= 1 the
    # stratified draws select a sample in every step anyway.)
    loss = identity_loss(model.face_net(chips), target_descriptor, mask, count)
    fit = jnp.sum(fits & mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, jnp.where(jnp.any(mask), fit, 1.0).astype(jnp.float32)


def batch_shards(sharding: jax.sharding.Sharding | None, batch: int) -> int:
    """How many devices a batch of ``batch`` is split over by ``sharding`` (1 when None)."""
    return 1 if sharding is None else batch // sharding.shard_shape((batch,))[0]


def total_loss(
    terms: dict[str, jax.Array], cfg: PhotoVerseConfig, mean_weight: float = 1.0
) -> jax.Array:
    """The weighted sum of the loss terms; ``mean_weight`` scales the per-example means
    (diffusion, text_reg, image_reg) and not the face term (a microbatch's share of a batch
    weighs its means 1/K, its face term is already its share of the batch's)."""
    means = (
        terms["diffusion"]
        + cfg.text_reg_weight * terms["text_reg"]
        + cfg.image_reg_weight * terms["image_reg"]
    )
    return mean_weight * means + cfg.face_weight * terms["face"]


# A training step's per-example random draws (:func:`draw_step_noise`).
STEP_DRAWS = ("latent_noise", "noise", "timesteps", "gamma", "sigma")


def draw_step_noise(
    model: PhotoVerse,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    schedule: NoiseSchedule,
    config: PhotoVerseConfig | None = None,
    fusion: bool = True,
) -> dict[str, jax.Array]:
    """Every per-example random draw of a training step, for the whole batch, from ``key``:
    the posterior draw of the latents, the diffusion noise, the timesteps (``batch``'s own
    when it has them) and the fusion weights (the config's fixed ones without ``fusion``).

    :func:`photoverse_loss` makes them here when its batch has none; gradient accumulation
    makes them once for the global batch and hands each microbatch its rows, so that every
    example draws what it would in the full batch.
    """
    cfg = config or model.config
    images = to_unit(batch["target"]) * 2.0 - 1.0
    b = images.shape[0]
    k_latent, k_noise, k_t, k_fuse = jax.random.split(key, 4)
    num_t = schedule.num_train_timesteps
    mean = jax.eval_shape(lambda x: model.vae.encode(x)[0], images)
    latent_noise = jax.random.normal(k_latent, mean.shape, mean.dtype)
    latents = jax.eval_shape(
        lambda x, n: model.vae.sample_latents(x, noise=n), images, latent_noise
    )
    t = batch.get("timesteps")
    if t is None and cfg.face_weight and cfg.face_batch_fraction != 1.0:
        t = draw_timesteps(k_t, b, num_t, cfg)
    elif t is None:
        t = jax.random.randint(k_t, (b,), 0, num_t)
    if fusion:
        gamma, sigma = random_fusion(k_fuse, b, cfg)
    else:
        gamma, sigma = jnp.full((b,), cfg.gamma), jnp.full((b,), cfg.sigma)
    return {
        "latent_noise": latent_noise,
        "noise": jax.random.normal(k_noise, latents.shape, latents.dtype),
        "timesteps": t,
        "gamma": gamma,
        "sigma": sigma,
    }


def photoverse_loss(
    model: PhotoVerse,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    schedule: NoiseSchedule,
    config: PhotoVerseConfig | None = None,
    fusion: bool = True,
    face_sharding: jax.sharding.Sharding | None = None,
    face_subset: int | None = None,
    face_count: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The total loss and its metrics (every term, unweighted, plus the face-loss fraction).

    ``fusion``: draw (gamma, sigma) per sample by random fusion (training); otherwise use the
    config's fixed gamma and sigma. ``face_sharding``: the sharding of the face loss's
    sub-batch (the batch's, so that each device decodes its share of it; the sub-batch is
    rounded up to a multiple of its shards, :func:`face_subset_size`).

    A microbatch of a larger batch (gradient accumulation) brings the batch's draws in
    ``batch`` (:data:`STEP_DRAWS`, :func:`draw_step_noise`) and its face-loss selection
    (``face_mask``), decodes ``face_subset`` samples and divides the face term by the whole
    batch's selected count ``face_count``: the terms then add up to the whole batch's.
    """
    cfg = config or model.config
    if cfg.face_weight and model.face_net is None:
        raise ValueError(
            f"face_weight={cfg.face_weight} needs a face net: build the model with "
            "with_face_net=True, or set face_weight=0"
        )
    target = to_unit(batch["target"])
    b = target.shape[0]
    num_t = schedule.num_train_timesteps
    # The devices the batch (and so the face sub-batch) is split over.
    shards = batch_shards(face_sharding, b)
    subset = face_subset_size(b, cfg, num_t, shards) if cfg.face_weight else b
    if face_subset is not None:
        subset = face_subset
    if not all(k in batch for k in STEP_DRAWS):
        draws = draw_step_noise(model, batch, key, schedule=schedule, config=cfg, fusion=fusion)
        batch = {**batch, **draws}
    latents = model.vae.sample_latents(target * 2.0 - 1.0, noise=batch["latent_noise"])
    latents = jax.lax.stop_gradient(latents)
    t, noise = batch["timesteps"], batch["noise"]
    x_t = add_noise(schedule, latents, noise, t)

    descriptors = None
    if cfg.uses_identity or cfg.face_weight:
        # The target's descriptor: the face loss's target and the identity tokens' input (the
        # reference is the same photo's face).
        descriptors = batch.get("descriptor")
        if descriptors is None and model.face_net is None:
            raise ValueError(
                f"image_source={cfg.image_source!r} needs each reference's dlib descriptor: "
                "put 'descriptor' (B, 128) in the batch, or build the model with_face_net=True"
            )
        if descriptors is None:
            descriptors = face_descriptors(model, target, batch["landmarks"])
        descriptors = jax.lax.stop_gradient(descriptors)
    words, image_tokens = model.encode_reference(
        batch["reference"], descriptors=descriptors if cfg.uses_identity else None
    )
    text = model.encode_text(batch["input_ids"], batch["slots"], words, batch.get("input_ids_2"))
    gamma, sigma = batch["gamma"], batch["sigma"]
    prediction = model.denoise(
        x_t, t, text, image_tokens, gamma=gamma, sigma=sigma, time_ids=batch.get("time_ids")
    )

    def predict(x: jax.Array, tt: jax.Array, idx: jax.Array | None) -> jax.Array:
        """The same conditioning's prediction for the samples ``idx`` (the face rollout's)."""
        cond = (text, image_tokens, gamma, sigma, batch.get("time_ids"))
        if idx is not None:
            cond = jax.tree.map(lambda a: jnp.take(a, idx, axis=0), cond)
        txt, tokens, g, s, time_ids = cond
        return model.denoise(x, tt, txt, tokens, gamma=g, sigma=s, time_ids=time_ids)

    terms = {
        "diffusion": diffusion_loss(prediction, training_target(schedule, latents, noise, t)),
        "text_reg": text_reg_loss(words),
        "image_reg": model.image_value_l1(image_tokens),
    }
    face_mask = batch.get("face_mask")
    if face_mask is None:
        face_mask = t <= cfg.t_face_max
    window_fit = jnp.ones((), jnp.float32)
    if cfg.face_weight:
        terms["face"], window_fit = face_loss(
            model,
            schedule,
            prediction,
            x_t,
            t,
            batch["landmarks"],
            descriptors,
            face_mask,
            image_hw=target.shape[1:3],
            subset=subset,
            window=cfg.face_window,
            sub_batch_sharding=face_sharding,
            rollout_steps=cfg.face_rollout_steps,
            predict=predict,
            count=face_count,
        )
    else:
        terms["face"] = jnp.zeros((), jnp.float32)
    total = total_loss(terms, cfg)
    # Samples that took the face loss: those with t <= t_face_max among the `subset` smallest t.
    taken = jnp.sum(face_mask)
    if cfg.face_weight and face_count is None:
        taken = jnp.minimum(taken, subset)
    metrics = {
        "loss": total,
        **terms,
        "face_fraction": taken.astype(jnp.float32) / b,
        "face_window_fit": window_fit,
    }
    return total, metrics
