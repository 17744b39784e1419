"""The PhotoVerse DDIM sampler: diffusers' DDIMScheduler on the same model outputs (txt2img and
img2img), one compilation for repeated calls, CFG at scale 1, seeds, batching, several
references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import face_batch
from diffusers import DDIMScheduler

from pv_jax.sampling import Sampler, SamplerSpec, encode_references
from pv_jax.sampling.sampler import step_keys

STEPS = 10


@pytest.fixture(scope="module")
def setup(tiny_pv):
    batch = face_batch(tiny_pv.tokenizer, ("a photo of S* as an astronaut",))
    refs = face_batch(tiny_pv.tokenizer, ("S*", "S*"))["reference"]  # two photos of one person
    empty = tiny_pv.tokenizer.plain([""])
    noise = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    return tiny_pv, Sampler(tiny_pv.model, tiny_pv.schedule), batch, refs, empty, noise


def _sample(sampler, batch, refs, empty, noise, key=0, **kw):
    return sampler(
        refs,
        batch["input_ids"],
        batch["slots"],
        empty,
        noise,
        jax.random.key(key),
        num_words=5,
        **kw,
    )


def _reference_ddim(pv, batch, refs, noise, key, eta, strength=1.0, init_latents=None):
    """diffusers' DDIMScheduler step by step on our model's outputs (txt2img or img2img)."""
    model = pv.model
    words, tokens = jax.jit(encode_references, static_argnums=2)(model, refs, 5)
    ctx = jax.jit(lambda m, i, s, w: m.encode_text(i, s, w))(
        model, batch["input_ids"], batch["slots"], words
    )
    unet = jax.jit(lambda m, x, t, c, f: m.denoise(x, t, c, f, gamma=1.0, sigma=1.0))
    ref = DDIMScheduler.from_config(pv.schedule.to_diffusers())
    ref.set_timesteps(STEPS)
    keys = step_keys(jax.random.split(jax.random.key(key), 1), STEPS)[:, 0]
    start = STEPS - int(STEPS * strength)  # diffusers' img2img get_timesteps
    timesteps = ref.timesteps[start:]
    x = torch.from_numpy(np.array(noise))
    if init_latents is not None:
        x = ref.add_noise(torch.from_numpy(np.asarray(init_latents)), x, timesteps[:1])
    x = x.numpy()
    for i, t in enumerate(timesteps, start):
        out = np.asarray(unet(model, jnp.asarray(x), jnp.asarray(int(t)), ctx, tokens))
        variance = np.asarray(jax.random.normal(keys[i], x.shape[1:]))[None] if eta else None
        x = ref.step(
            torch.from_numpy(out),
            t,
            torch.from_numpy(x),
            eta=eta,
            variance_noise=None if variance is None else torch.from_numpy(variance),
        ).prev_sample.numpy()
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_loop_matches_diffusers_scheduler(setup, eta):
    pv, sampler, batch, refs, empty, noise = setup
    spec = SamplerSpec(steps=STEPS, eta=eta, cfg=False)
    got = _sample(sampler, batch, refs, empty, noise, key=3, spec=spec, decode=False)
    want = _reference_ddim(pv, batch, refs, noise, 3, eta)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_img2img_matches_diffusers_from_the_noised_init(setup):
    pv, sampler, batch, refs, empty, noise = setup
    init = np.asarray(
        jax.random.uniform(jax.random.key(5), (1, 32, 32, 3)), np.float32
    )  # an image in [0, 1]
    spec = SamplerSpec(steps=STEPS, eta=0.5, cfg=False, strength=0.6)
    assert spec.start == 4  # 6 of 10 steps run
    got = _sample(
        sampler, batch, refs, empty, noise, key=3, spec=spec, decode=False, init_images=init
    )
    vae = pv.model.vae
    mean, _ = jax.jit(lambda v, x: v.encode(x))(vae, jnp.asarray(init) * 2 - 1)
    want = _reference_ddim(pv, batch, refs, noise, 3, 0.5, 0.6, vae.scale_latents(mean))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    # A low strength keeps the result close to the init latents; txt2img does not.
    txt2img = _sample(
        sampler, batch, refs, empty, noise, spec=SamplerSpec(steps=STEPS, cfg=False), decode=False
    )
    low = _sample(
        sampler,
        batch,
        refs,
        empty,
        noise,
        spec=SamplerSpec(steps=STEPS, cfg=False, strength=0.2),
        decode=False,
        init_images=init,
    )
    init_latents = np.asarray(vae.scale_latents(mean))
    assert (
        np.abs(np.asarray(low) - init_latents).mean()
        < np.abs(np.asarray(txt2img) - init_latents).mean()
    )
    with pytest.raises(ValueError, match="needs init_images"):
        _sample(sampler, batch, refs, empty, noise, spec=SamplerSpec(steps=4, strength=0.5))
    with pytest.raises(ValueError, match="runs no step"):
        SamplerSpec(steps=4, strength=0.2)


def test_a_row_does_not_depend_on_its_batch(setup):
    pv, sampler, batch, refs, empty, _ = setup
    spec = SamplerSpec(steps=4, eta=0.5)
    noise = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    keys = jax.random.split(jax.random.key(2), 2)
    both = sampler(
        refs,
        np.repeat(batch["input_ids"], 2, 0),
        np.repeat(batch["slots"], 2, 0),
        empty,
        noise,
        keys,
        num_words=5,
        spec=spec,
        decode=False,
    )
    for i in range(2):
        one = sampler(
            refs,
            batch["input_ids"],
            batch["slots"],
            empty,
            noise[i : i + 1],
            keys[i : i + 1],
            num_words=5,
            spec=spec,
            decode=False,
        )
        # Same computation, other matmul shapes: float32 rounding only (guidance 7.5 amplifies).
        np.testing.assert_allclose(np.asarray(both[i]), np.asarray(one[0]), atol=1e-4, rtol=1e-4)


def test_one_trace_for_repeated_calls_seeds_and_knobs(setup):
    pv, _, batch, refs, empty, noise = setup
    sampler = Sampler(pv.model, pv.schedule)
    spec = SamplerSpec(steps=4)
    a = _sample(sampler, batch, refs, empty, noise, spec=spec)
    b = _sample(sampler, batch, refs, empty, noise, spec=spec)
    c = _sample(sampler, batch, refs, empty, noise * 0.5 + 0.1, key=1, spec=spec)
    d = _sample(sampler, batch, refs, empty, noise, spec=spec, guidance=3.0, sigma=0.5)
    # A raw uint32 key (jax.random.PRNGKey) is the same key as its typed form.
    raw = sampler(
        refs,
        batch["input_ids"],
        batch["slots"],
        empty,
        noise,
        jax.random.PRNGKey(0),
        num_words=5,
        spec=spec,
    )
    np.testing.assert_array_equal(np.asarray(raw), np.asarray(a))
    assert sampler.traces == 1  # new seeds, noise and knobs reuse the compilation
    assert sampler.last_compile_s == 0.0
    chex.assert_shape(a, (1, 32, 32, 3))
    assert float(jnp.std(a)) > 1e-3  # an image, not a constant (the output is clipped)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same seed, same image
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3  # another seed differs
    assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-3  # the knobs act


# The guided specs below are the row test's (4 steps, eta 0.5, CFG): one compilation for them.
def test_guidance_scale_one_equals_the_conditional_pass(setup):
    _, sampler, batch, refs, empty, noise = setup
    spec = SamplerSpec(steps=4, eta=0.5)
    guided = _sample(sampler, batch, refs, empty, noise, spec=spec, guidance=1.0, decode=False)
    plain = _sample(
        sampler,
        batch,
        refs,
        empty,
        noise,
        spec=SamplerSpec(steps=4, eta=0.5, cfg=False),
        decode=False,
    )
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)


def test_unconditional_pass_is_the_frozen_base_or_the_lora(setup):
    # guidance 0 keeps the unconditional pass alone. "base" ignores the knobs (no LoRA, no image
    # branch, text weight 1); "lora" runs the LoRA with text weight gamma + sigma.
    _, sampler, batch, refs, empty, noise = setup

    def uncond(mode, gamma, sigma, alpha=1.0):
        spec = SamplerSpec(steps=4, eta=0.5, uncond=mode)
        kw = dict(guidance=0.0, gamma=gamma, sigma=sigma, alpha=alpha, decode=False, spec=spec)
        return np.asarray(_sample(sampler, batch, refs, empty, noise, **kw))

    np.testing.assert_array_equal(uncond("base", 0.5, 1.0), uncond("base", 2.0, 0.0, 0.3))
    np.testing.assert_allclose(uncond("lora", 0.5, 1.0), uncond("lora", 1.5, 0.0), atol=1e-6)
    assert np.abs(uncond("lora", 0.5, 1.0) - uncond("lora", 1.0, 0.0)).max() > 1e-3
    with pytest.raises(ValueError, match="uncond must be one of"):
        SamplerSpec(uncond="none")


def test_several_references_average(setup):
    pv, _, _, refs, _, _ = setup
    enc = jax.jit(encode_references, static_argnums=2)
    words, tokens = enc(pv.model, refs, 3)
    w0, t0 = enc(pv.model, refs[:1], 3)
    w1, t1 = enc(pv.model, refs[1:], 3)
    chex.assert_shape(words, (1, 3, 64))
    np.testing.assert_allclose(np.asarray(words), (np.asarray(w0) + np.asarray(w1)) / 2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tokens), (np.asarray(t0) + np.asarray(t1)) / 2, atol=1e-6)
    assert np.abs(np.asarray(w0) - np.asarray(w1)).max() > 1e-3  # the photos differ
