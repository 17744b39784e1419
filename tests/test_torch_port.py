"""photoverse_torch against pv_jax on the committed toy run (the released one: identity tokens
beside the encoder's), through its export, fp32: the adapters' pseudo-words and image tokens,
the text conditioning with the words injected, and the UNet with the dual-branch processors and
the LoRA (PEFT) at several gamma / sigma / alpha."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx

from pv_jax.face.references import load_reference

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models/toy_faces/photoverse"
SD = ROOT / "models/toy_faces/sd_v2"  # the base the released run trained on
ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


@pytest.fixture(scope="module")
def pair(toy_export):
    """(our bundle, the export read by photoverse_torch, the astronaut's face record, the
    export's path)."""
    from photoverse_torch import read_export

    bundle, out = toy_export
    assert Path(bundle.source["base"]["sd_folder"]) == SD
    return bundle, read_export(str(out)), load_reference(ASTRONAUT), out


def _descriptors(bundle, record) -> np.ndarray | None:
    """The reference's dlib descriptor (1, 128) when the run reads identity tokens."""
    return record.descriptor[None] if bundle.config.uses_identity else None


def test_adapters_match_ours(pair):
    from transformers import CLIPVisionModel

    from photoverse_torch import PhotoVerseAdapters, preprocess_reference

    bundle, export, record, _ = pair
    desc = _descriptors(bundle, record)
    assert desc is not None  # the released run: identity tokens beside the encoder's
    words, tokens = bundle.model.encode_reference(record.reference[None], descriptors=desc)
    vision = CLIPVisionModel.from_pretrained(
        str(ROOT / "models/toy_faces/clip_vision"),
        dtype=torch.float32,  # stored in fp16
    ).eval()
    adapters = PhotoVerseAdapters.from_export(export)
    with torch.no_grad():
        pixels = preprocess_reference(torch.from_numpy(record.reference[None]), 64)
        states = vision(pixels, output_hidden_states=True).hidden_states
        got_words, got_tokens = adapters(states, descriptors=torch.from_numpy(desc))
    with pytest.raises(ValueError, match="pass descriptors"):
        adapters(states)
    np.testing.assert_allclose(got_words.numpy(), np.asarray(words), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_tokens.numpy(), np.asarray(tokens), atol=1e-5, rtol=0)


def test_text_conditioning_with_injected_words_matches_ours(pair):
    from transformers import CLIPTextModel

    from photoverse_torch import inject_words

    bundle, _, record, _ = pair
    words, _ = bundle.model.encode_reference(
        record.reference[None], None, _descriptors(bundle, record)
    )
    prompt = bundle.tokenizer(["a photo of S* in red light"], bundle.config.words)
    want = bundle.model.encode_text(prompt.input_ids, prompt.slots, words).context
    text = CLIPTextModel.from_pretrained(str(SD / "text_encoder"), dtype=torch.float32).eval()
    slots = torch.from_numpy(prompt.slots.astype(np.int64))
    with torch.no_grad(), inject_words(text, slots, torch.from_numpy(np.array(words))):
        got = text(torch.from_numpy(prompt.input_ids.astype(np.int64))).last_hidden_state
        plain = text(torch.from_numpy(prompt.input_ids.astype(np.int64))).last_hidden_state
    np.testing.assert_allclose(got.numpy(), np.asarray(want), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(plain.numpy(), got.numpy())  # the hook holds while open
    with torch.no_grad():  # ... and only then
        after = text(torch.from_numpy(prompt.input_ids.astype(np.int64))).last_hidden_state
    assert np.abs(after.numpy() - got.numpy()).max() > 1e-3


@pytest.mark.parametrize("gamma, sigma, alpha", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.5)])
def test_unet_with_the_dual_branch_matches_ours(pair, gamma, sigma, alpha):
    from diffusers import UNet2DConditionModel

    from photoverse_torch import install, knobs

    bundle, export, record, _ = pair
    _, tokens = bundle.model.encode_reference(
        record.reference[None], None, _descriptors(bundle, record)
    )
    unet = UNet2DConditionModel.from_pretrained(str(SD / "unet"), torch_dtype=torch.float32).eval()
    install(unet, export)
    r = np.random.RandomState(0)
    x = r.randn(1, 8, 8, unet.config.in_channels).astype(np.float32)
    ctx = r.randn(1, 77, unet.config.cross_attention_dim).astype(np.float32)
    t = np.array([600])
    graphdef, state = nnx.split(bundle.model.unet)

    @jax.jit  # compiled once (6 s) instead of run op by op (19 s); the knobs are traced
    def ours(state, x, t, ctx, tokens, knobs):
        kwargs = dict(image_tokens=tokens, gamma=knobs[0], sigma=knobs[1], alpha=knobs[2])
        return nnx.merge(graphdef, state)(x, t, ctx, cross_attention_kwargs=kwargs)

    want = ours(state, x, t, ctx, tokens, jnp.array([gamma, sigma, alpha]))
    with torch.no_grad():
        got = unet(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            cross_attention_kwargs=knobs(torch.from_numpy(np.array(tokens)), gamma, sigma, alpha),
        ).sample
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), np.asarray(want), atol=1e-4)
    # Self-attention layers take the knobs silently (diffusers logs kwargs a processor lacks).
    for processor in unet.attn_processors.values():
        assert "image_tokens" in inspect.signature(processor.__call__).parameters


def test_faces_are_pv_jaxs_without_jax(tmp_path):
    """photoverse_torch.load_face gives pv_jax's reference crop and descriptor, exactly: on the
    astronaut (two faces: the largest, then the other), a CelebA photo, and a transparent PNG;
    a photo without a face is one error naming it."""
    from PIL import Image

    from photoverse_torch import load_face
    from pv_jax.toy.wheel import celeba_photo

    rgba = np.dstack([np.asarray(Image.open(ASTRONAUT)), np.full((512, 512), 200, np.uint8)])
    png = tmp_path / "astronaut_rgba.png"
    Image.fromarray(rgba).save(png)
    for photo, index in ((ASTRONAUT, 0), (ASTRONAUT, 1), (celeba_photo("000020.jpg"), 0), (png, 0)):
        ours = load_reference(photo, face_index=index)
        face = load_face(photo, face_index=index)
        np.testing.assert_array_equal(face.reference, ours.reference)
        np.testing.assert_array_equal(face.descriptor, ours.descriptor)
        np.testing.assert_array_equal(face.box, ours.face_box)
        assert face.num_faces == ours.num_faces
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match="blank.png: face 0 asked for, 0 found"):
        load_face(tmp_path / "blank.png")


def test_the_package_imports_no_jax():
    import subprocess
    import sys

    code = "import sys, photoverse_torch; sys.exit('jax' in sys.modules or 'flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow  # two samplers compiled and run per case: make test-all (CI)
@pytest.mark.parametrize("uncond", ["base", "lora"])
def test_pipeline_latents_equal_our_samplers_on_the_same_noise(pair, uncond):
    """DDIM + CFG (guidance 3, our unconditional rule) from the same start noise, 5 steps,
    two images: the latents within 1e-4, and the decoded images too."""
    import jax

    from photoverse_torch import PhotoVerseTorchPipeline
    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.sampling.sampler import SamplerSpec

    bundle, _, record, path = pair
    ours = PhotoVersePipeline(bundle)
    m = bundle.config.words
    prompt = bundle.tokenizer(["a photo of S*"] * 2, m)
    noise = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    common = dict(num_words=m, guidance=3.0, gamma=1.0, sigma=1.0, alpha=1.0)
    spec = SamplerSpec(steps=5, uncond=uncond)
    args = (record.reference[None], prompt.input_ids, prompt.slots, ours.empty["empty_ids"])
    desc = _descriptors(bundle, record)
    key = jax.random.key(0)
    want = ours.sampler(*args, noise, key, spec=spec, decode=False, descriptors=desc, **common)
    images = ours.sampler(*args, noise, key, spec=spec, descriptors=desc, **common)
    pipe = PhotoVerseTorchPipeline.from_export(
        path,
        sd_folder=SD,
        clip_vision_folder=ROOT / "models/toy_faces/clip_vision",
    )
    got = pipe(
        record.reference[None],
        "a photo of S*",
        noise=torch.from_numpy(np.array(noise).transpose(0, 3, 1, 2)),
        steps=5,
        guidance=3.0,
        uncond=uncond,
        descriptors=desc,
    )
    np.testing.assert_allclose(
        got.latents.numpy().transpose(0, 2, 3, 1), np.asarray(want), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(got.images, np.asarray(images), atol=1e-4, rtol=0)


def test_jax_noise_without_jax_equals_jaxs():
    """photoverse_torch's numpy threefry gives jax.random's bits exactly and its normals to the
    inverse error function's last bits."""
    import jax

    from photoverse_torch.jax_noise import normal, random_bits, seed_key, start_noise

    for seed in (0, 7, 123456):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(
            random_bits(seed_key(seed), (8, 8, 4)), np.asarray(jax.random.bits(key, (8, 8, 4)))
        )
        want = np.asarray(jax.random.normal(key, (8, 8, 4)))
        np.testing.assert_allclose(normal(seed, (8, 8, 4)).numpy(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a 32-bit integer"):
        seed_key(2**31)
    neg = np.asarray(jax.random.normal(jax.random.key(-5), (4,)))
    np.testing.assert_allclose(normal(-5, (4,)).numpy(), neg, atol=1e-5, rtol=0)
    pair = start_noise([3, 4], 8, 4)
    assert pair.shape == (2, 4, 8, 8)
    want = np.asarray(jax.random.normal(jax.random.key(4), (8, 8, 4))).transpose(2, 0, 1)
    np.testing.assert_allclose(pair[1].numpy(), want, atol=1e-5, rtol=0)
    # DDIM's variance noise (eta > 0): the seed's key folded with 1, split per step.
    from photoverse_torch.jax_noise import fold_in, split, step_noise
    from pv_jax.diffusion.schedules import step_keys

    key_data = jax.random.key_data
    folded = jax.random.fold_in(jax.random.key(7), 1)
    assert fold_in(seed_key(7), 1) == tuple(np.asarray(key_data(folded)))
    assert split((5, 9), 3) == [
        tuple(k)
        for k in np.asarray(
            key_data(jax.random.split(jax.random.wrap_key_data(np.array([5, 9], np.uint32)), 3))
        )
    ]
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(np.array([3, 4]))
    per_step = step_keys(keys, 5)  # (steps, B), as the sampler draws them
    want = jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (8, 8, 4))))(per_step)
    got = step_noise([3, 4], 5, 8, 4)
    assert got.shape == (5, 2, 4, 8, 8)
    np.testing.assert_allclose(
        got.numpy().transpose(0, 1, 3, 4, 2), np.asarray(want), atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_the_make_demo_images_from_the_export_with_the_same_seeds(pair):
    """The toy run's export in the PyTorch pipeline, on the astronaut with sample.py's seeds at
    the run's tuned guidance and eta (1: DDPM's variance noise, drawn step by step as ours),
    draws sample.py's images (uint8: within one grey level)."""
    from photoverse_torch import PhotoVerseTorchPipeline
    from pv_jax.sampling.pipeline import PhotoVersePipeline
    from pv_jax.sampling.tuned import tuned_settings

    bundle, _, record, path = pair
    tuned = {k: tuned_settings(TOY)[k] for k in ("guidance", "eta")}
    assert tuned["eta"] == 1.0  # the case that needs our variance noise
    ours = PhotoVersePipeline(bundle)(
        [record], ["a photo of S*"], num_images=2, seed=5, steps=5, identity=False, **tuned
    )
    pipe = PhotoVerseTorchPipeline.from_export(
        path, sd_folder=SD, clip_vision_folder=ROOT / "models/toy_faces/clip_vision"
    )
    got = pipe([ASTRONAUT], "a photo of S*", seeds=[5, 6], steps=5, **tuned)  # photo in
    got = (got.images * 255).round().astype(np.int16)
    assert np.abs(got - ours.images.astype(np.int16)).max() <= 1
