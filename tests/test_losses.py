"""PhotoVerse's losses: each term against a direct computation, the face loss's fixed point and
gradient path, and a tiny-config overfit run."""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data
from conftest import face_batch, tiny_loss_and_grads
from flax import nnx

from pv_jax.data import preprocess as pp
from pv_jax.diffusion import add_noise
from pv_jax.face import align_faces
from pv_jax.photoverse import (
    PhotoVerseConfig,
    cross_attentions,
    photoverse_loss,
    split_trainable,
    tiny_photoverse,
)
from pv_jax.photoverse.losses import draw_timesteps, face_descriptors, face_loss, face_subset_size


def _cos(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_loss_terms_match_direct_computation(tiny_pv):
    model, sched = tiny_pv.model, tiny_pv.schedule
    # The whole image decoded (the window is tested against the full decode separately); the
    # default sub-batch of round(2 * 0.501) = 1 sample keeps the one with t <= 500. The loss is
    # test_photoverse_model.py's program (with gradients): compiled once for both tests.
    cfg, loss_and_grads = tiny_loss_and_grads(tiny_pv)
    _, trainable, frozen = split_trainable(model)
    batch = face_batch(tiny_pv.tokenizer)
    batch["timesteps"] = np.array([200, 800])  # one sample inside the face-loss range, one not
    key = jax.random.key(3)

    @jax.jit
    def direct(model, batch):
        """The forward pass step by step, with the same random draws."""
        k_latent, k_noise, _, _ = jax.random.split(key, 4)
        latents = model.vae.sample_latents(jnp.asarray(batch["target"]) * 2 - 1, k_latent)
        noise = jax.random.normal(k_noise, latents.shape)
        t = jnp.asarray(batch["timesteps"])
        x_t = add_noise(sched, latents, noise, t)
        words, f = model.encode_reference(batch["reference"])
        ctx = model.encode_text(batch["input_ids"], batch["slots"], words)
        pred = model.denoise(x_t, t, ctx, f, gamma=cfg.gamma, sigma=cfg.sigma)
        x0 = (x_t - jnp.sqrt(1 - abar) * pred) / jnp.sqrt(abar)
        image = jnp.clip(model.vae.decode(model.vae.unscale_latents(x0)) / 2 + 0.5, 0, 1)
        chips = align_faces(image * 255, batch["landmarks"], quantize=False)
        target_chips = align_faces(batch["target"] * 255, batch["landmarks"], quantize=False)
        desc = (model.face_net(chips), model.face_net(target_chips))
        return pred, noise, words, f, desc

    abar = sched.alphas_cumprod[batch["timesteps"]][:, None, None, None]
    pred, noise, words, f, (desc, target_desc) = jax.tree.map(np.asarray, direct(model, batch))
    # The training data's precomputed descriptor of the target (the direct one here).
    total, m, _, _ = loss_and_grads(trainable, frozen, dict(batch, descriptor=target_desc), key)
    np.testing.assert_allclose(m["diffusion"], np.mean((pred - noise) ** 2), rtol=1e-5)
    np.testing.assert_allclose(m["text_reg"], np.abs(words).mean(), rtol=1e-5)
    per_layer = [
        np.abs(f @ np.asarray(a.to_v_s.kernel.get_value())).mean()
        for a in cross_attentions(model.unet)
    ]
    np.testing.assert_allclose(m["image_reg"], np.mean(per_layer), rtol=1e-5)

    cos = _cos(desc, target_desc)
    np.testing.assert_allclose(m["face"], 1 - cos[0], atol=1e-5)  # only t=200 <= 500 counts
    assert float(m["face_fraction"]) == 0.5

    want = (
        m["diffusion"]
        + cfg.face_weight * m["face"]
        + cfg.text_reg_weight * m["text_reg"]
        + cfg.image_reg_weight * m["image_reg"]
    )
    np.testing.assert_allclose(total, want, rtol=1e-6)
    assert cfg.face_weight == 0.01 and cfg.text_reg_weight == 0.01
    assert cfg.image_reg_weight == 0.001
    # Without a descriptor in the batch the loss computes it from the target (the same value).
    loss_fn = jax.jit(functools.partial(photoverse_loss, schedule=sched, fusion=False, config=cfg))
    np.testing.assert_allclose(loss_fn(model, batch, key)[1]["face"], m["face"], atol=1e-5)


def test_face_loss_zero_for_an_image_compared_with_itself(tiny_pv):
    model, sched = tiny_pv.model, tiny_pv.schedule
    batch = face_batch(tiny_pv.tokenizer)
    latents = model.vae.sample_latents(jnp.asarray(batch["target"]) * 2 - 1, jax.random.key(0))
    noise = jax.random.normal(jax.random.key(1), latents.shape)
    t = jnp.array([50, 400])
    x_t = add_noise(sched, latents, noise, t)
    own = jax.jit(
        lambda m, z, lm: face_descriptors(
            m, jnp.clip(m.vae.decode(m.vae.unscale_latents(z)) / 2 + 0.5, 0, 1), lm
        )
    )(model, latents, batch["landmarks"])
    # The loss and its gradient in the prediction: one program for the three cases.
    run = jax.jit(jax.value_and_grad(lambda *a: face_loss(model, sched, *a, image_hw=(32, 32))[0]))
    # The true noise as prediction: x0_hat is the clean latent, decoded to the same image.
    loss, _ = run(noise, x_t, t, batch["landmarks"], own, jnp.array([True, True]))
    assert abs(float(loss)) < 1e-5
    other, g = run(noise * 0.5, x_t, t, batch["landmarks"], own, jnp.ones(2, bool))
    assert float(other) > 1e-3 and np.abs(np.asarray(g)).max() > 0
    none, g = run(noise * 0.5, x_t, t, batch["landmarks"], own, jnp.zeros(2, bool))
    assert float(none) == 0.0
    # No sample selected: the term is still computed (no lax.cond), with zero gradients.
    assert np.all(np.asarray(g) == 0.0)

    # A 3-step rollout whose later predictions are the true noise of whatever they are fed
    # recovers the clean latents too; from a wrong first prediction, only with them.
    abar = lambda tt: jnp.asarray(sched.alphas_cumprod)[tt][:, None, None, None]

    def oracle(x, tt, idx):
        lat = latents if idx is None else latents[idx]
        return (x - jnp.sqrt(abar(tt)) * lat) / jnp.sqrt(1 - abar(tt))

    # scale 1: the oracle, 0.5: a wrong one (a traced factor: one program for both).
    rolled = jax.jit(
        lambda p, scale: face_loss(
            model,
            sched,
            p,
            x_t,
            t,
            batch["landmarks"],
            own,
            jnp.ones(2, bool),
            image_hw=(32, 32),
            rollout_steps=3,
            predict=lambda x, tt, idx: scale * oracle(x, tt, idx),
            subset=1,
        )[0]
    )
    assert abs(float(rolled(noise * 0.5, 1.0))) < 1e-5
    assert float(rolled(noise * 0.5, 0.5)) > 1e-3


@pytest.mark.slow  # one-step x0: test_photoverse_model.py's gradient test, in make test
def test_face_gradients_reach_the_adapters_through_a_rollout(tiny_pv):
    # x0 by a 2-step DDIM rollout, gradients through both UNet calls (rollout_x0's own gradient
    # is checked in test_schedules.py).
    graphdef, trainable, frozen = split_trainable(tiny_pv.model)
    cfg = dataclasses.replace(tiny_pv.config, face_rollout_steps=2)
    batch = face_batch(tiny_pv.tokenizer)
    batch["timesteps"] = np.array([100, 250])

    @jax.jit
    def face_grads(trainable, frozen, batch):
        def face_term(tr):
            m = nnx.merge(graphdef, tr, frozen)
            _, metrics = photoverse_loss(
                m, batch, jax.random.key(0), schedule=tiny_pv.schedule, fusion=False, config=cfg
            )
            return metrics["face"]

        return jax.grad(face_term)(trainable)

    g = face_grads(trainable, frozen, batch)
    # Adapters -> pseudo-words / image tokens -> UNet -> x0_hat -> VAE decoder -> chip -> face net.
    for name in ("text_adapter", "image_adapter"):
        leaves = jax.tree.leaves(g[name])
        assert leaves and all(np.isfinite(x).all() for x in leaves)
        assert max(float(np.abs(x).max()) for x in leaves) > 0, name


def test_face_weight_needs_a_face_net(tiny_pv):
    model = nnx.clone(tiny_pv.model)
    model.face_net = None
    batch = face_batch(tiny_pv.tokenizer)
    with pytest.raises(ValueError, match="face_weight=0.01 needs a face net"):
        photoverse_loss(model, batch, jax.random.key(0), schedule=tiny_pv.schedule)


@pytest.mark.slow
def test_overfit_tiny_batch():
    bundle = tiny_photoverse(seed=1)
    cfg = dataclasses.replace(bundle.config, t_face_max=1000)  # face loss on every sample
    graphdef, trainable, frozen = split_trainable(bundle.model)
    batch = face_batch(bundle.tokenizer)
    key = jax.random.key(0)  # the same noise, timesteps and fusion draw at every step
    opt = optax.adamw(3e-3)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        def loss(tr):
            m = nnx.merge(graphdef, tr, frozen)
            return photoverse_loss(m, batch, key, schedule=bundle.schedule, config=cfg)

        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    history = []
    for _ in range(60):
        trainable, opt_state, metrics = step(trainable, opt_state)
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], history[-1]
    print(f"overfit: loss {first['loss']:.4f} -> {last['loss']:.4f}")
    assert np.isfinite([h["loss"] for h in history]).all()
    assert last["loss"] < 0.5 * first["loss"]
    assert last["diffusion"] < first["diffusion"]


@pytest.fixture(scope="module")
def astronaut_256():
    """skimage's astronaut preprocessed to a 256 px target with its 5 landmarks."""
    rec = pp.preprocess_image(
        skimage.data.astronaut(), pp.PreprocessConfig(upsample=0, target_size=256)
    )
    return rec.target.astype(np.float32) / 255.0, rec.landmarks


def _local_decoder_model(face_net, factor: int = 8):
    """A model whose VAE decoder is pixel-local: each latent becomes a factor x factor block."""

    def decode(z):
        return jnp.repeat(jnp.repeat(z, factor, axis=1), factor, axis=2) * 2.0 - 1.0

    def decode_images(z):  # AutoencoderKL.decode_images with this decoder
        return jnp.clip(decode(z) / 2 + 0.5, 0.0, 1.0)

    vae = types.SimpleNamespace(
        decode=decode, unscale_latents=lambda z: z, decode_images=decode_images
    )
    return types.SimpleNamespace(vae=vae, face_net=face_net)


def test_window_and_sub_batch_equal_the_full_decode_for_a_local_decoder(tiny_pv, astronaut_256):
    """With a pixel-local decoder, the windowed sub-batch face loss (and its gradient) is the
    whole-image, whole-batch one: the window origin, landmark shift and pyramid are exact."""
    image, lm = astronaut_256
    shifted = np.roll(image, (24, -40), axis=(0, 1))  # the face off centre
    images = np.stack([image, image[:, ::-1], shifted])
    lms = np.stack([lm, np.stack([255 - lm[:, 0], lm[:, 1]], -1), lm + [-40, 24]])
    latents = jnp.asarray(images.reshape(3, 32, 8, 32, 8, 3).mean((2, 4)))
    sched = tiny_pv.schedule
    noise = jax.random.normal(jax.random.key(0), latents.shape)
    t = jnp.array([100, 700, 300])
    x_t = add_noise(sched, latents, noise, t)
    model = _local_decoder_model(tiny_pv.model.face_net)
    desc = jax.random.normal(jax.random.key(1), (3, 128))
    mask = t <= 500

    def loss(pred, subset, window):
        return face_loss(
            model,
            sched,
            pred,
            x_t,
            t,
            jnp.asarray(lms),
            desc,
            mask,
            image_hw=(256, 256),
            subset=subset,
            window=window,
        )

    def value_and_grad(subset, window):  # one program each: the loss, its fit and gradient
        return jax.jit(jax.value_and_grad(lambda p: loss(p, subset, window), has_aux=True))(noise)

    (full, full_fit), g_full = value_and_grad(None, 1.0)
    (win, fit), g_win = value_and_grad(2, 0.625)
    np.testing.assert_allclose(win, full, atol=1e-6)
    assert float(full) > 0.0 and float(fit) == float(full_fit) == 1.0
    np.testing.assert_allclose(g_win, g_full, rtol=1e-4, atol=1e-6)  # fp32 summation order
    assert float(jnp.abs(g_full[1]).max()) == 0.0 and float(jnp.abs(g_full[0]).max()) > 0.0
    # A window too small for the chip is reported (the loss is still computed on what it holds).
    _, small_fit = jax.jit(lambda p: loss(p, 2, 0.3))(noise)
    assert float(small_fit) == 0.0


def test_stratified_timesteps_keep_a_uniform_marginal():
    """t stays uniform on [0, T) per sample; the face-range count is floor(Bp) or floor(Bp)+1."""
    cfg = PhotoVerseConfig()
    p = 501 / 1000
    assert [face_subset_size(b, cfg, 1000) for b in (1, 2, 3, 8, 64)] == [1, 1, 2, 4, 32]
    assert face_subset_size(8, dataclasses.replace(cfg, face_batch_fraction=1.0), 1000) == 8
    # Split over devices: rounded up to a multiple of them (when they divide the batch).
    sizes = {(b, n): face_subset_size(b, cfg, 1000, n) for b, n in [(4, 4), (12, 4), (64, 16)]}
    assert sizes == {(4, 4): 4, (12, 4): 8, (64, 16): 32}
    assert face_subset_size(64, cfg, 1000, 64) == 64 and face_subset_size(6, cfg, 1000, 4) == 3
    n = 4000
    for b in (1, 3, 64):
        keys = jax.random.split(jax.random.key(b), n)
        t = np.asarray(jax.vmap(lambda k, b=b: draw_timesteps(k, b, 1000, cfg))(keys))
        low = (t <= 500).sum(1)
        assert set(np.unique(low)) <= {int(b * p), int(b * p) + 1}
        np.testing.assert_allclose(low.mean(), b * p, atol=4 * 0.5 / np.sqrt(n))
        # Each position's marginal is uniform: 10 bins of t, within 5 sigma of n / 10.
        counts = np.bincount(t[:, 0] // 100, minlength=10)
        assert np.all(np.abs(counts - n / 10) < 5 * np.sqrt(n / 10 * 0.9)), counts


def test_face_loss_options_are_checked():
    """Out-of-range face sub-batch and window fractions fail with the field's name."""
    with pytest.raises(ValueError, match="face_window must be in"):
        PhotoVerseConfig(face_window=0.0)
    with pytest.raises(ValueError, match="face_batch_fraction must be in"):
        PhotoVerseConfig(face_batch_fraction=1.5)
    with pytest.raises(ValueError, match="face_rollout_steps must be >= 1"):
        PhotoVerseConfig(face_rollout_steps=0)
