"""photoverse_torch on SDXL against pv_jax, fp32: a tiny SDXL-shaped PhotoVerse (two text towers
of widths 64 and 96, SDXL's added embedding) built from a diffusers SDXL folder, its trainable
weights perturbed away from their init (the LoRA's B and the image branch non-zero), exported,
and read back by the PyTorch pipeline: the pseudo-words and image tokens, the two towers' text
conditioning with the words injected, and the sampler's latents on the same noise."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

PROMPT = "a photo of S* in a garden"


@pytest.fixture(scope="module")
def xl_export(tmp_path_factory):
    """(our bundle, the export's path, the SDXL folder, the vision folder, references (2, 224,
    224, 3) uint8, their descriptors (2, 128))."""
    from conftest import tiny_sdxl_folders

    from pv_jax.export import write_export
    from pv_jax.photoverse import TINY_CONFIG, build_photoverse, split_trainable

    tmp = tmp_path_factory.mktemp("xl_export")
    _, folder, vision = tiny_sdxl_folders(tmp, seed=11)
    rng = np.random.default_rng(11)
    config = dataclasses.replace(TINY_CONFIG, image_source="both", identity_tokens=2)
    bundle = build_photoverse(
        config, sd_folder=folder, clip_vision_folder=vision, with_face_net=False
    )
    # A trained run's weights, not the init: every trainable tensor moved (LoRA B from 0 too).
    _, trainable, _ = split_trainable(bundle.model)
    leaves, treedef = jax.tree.flatten(trainable)
    noise = [0.05 * rng.standard_normal(np.shape(x)).astype(np.float32) for x in leaves]
    nnx.update(
        bundle.model,
        jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)]),
    )
    base = {"sd_folder": str(folder), "clip_vision_folder": str(vision)}
    bundle = dataclasses.replace(
        bundle,
        source={"base": base, "workdir": str(tmp), "step": 3, "weights": "trainable"},
    )
    path = tmp / "xl.safetensors"
    write_export(bundle, path)
    refs = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    descs = rng.standard_normal((2, 128)).astype(np.float32) * 0.1
    return bundle, path, folder, vision, refs, descs


@pytest.fixture(scope="module")
def pipe(xl_export):
    """The PyTorch pipeline read from the export (the base from its metadata)."""
    from photoverse_torch import PhotoVerseTorchPipeline

    return PhotoVerseTorchPipeline.from_export(xl_export[1])


def test_sdxl_adapters_and_both_towers_match_ours(xl_export, pipe):
    from photoverse_torch import preprocess_reference

    bundle, _, _, _, refs, descs = xl_export
    model = bundle.model
    m = bundle.config.words
    assert pipe.is_xl and pipe.force_zeros
    # The folder's scheduler config is bare; the export carries the schedule the run used.
    np.testing.assert_allclose(
        pipe.scheduler.alphas_cumprod.numpy(), bundle.schedule.alphas_cumprod, rtol=1e-6
    )
    # Jitted (op by op: 240 small compilations).
    words, tokens = jax.jit(lambda mod, r, d: mod.encode_reference(r, m, d))(
        model, jnp.asarray(refs), jnp.asarray(descs)
    )
    pixels = preprocess_reference(torch.from_numpy(refs), pipe.image_encoder.config.image_size)
    with torch.no_grad():
        states = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states
        t_words, t_tokens = pipe.adapters(states, m, torch.from_numpy(descs))
    assert t_words.shape[-1] == sum(model.text_widths)  # 64 + 96: one word for both towers
    np.testing.assert_allclose(t_words.numpy(), np.asarray(words), atol=1e-5, rtol=0)
    np.testing.assert_allclose(t_tokens.numpy(), np.asarray(tokens), atol=1e-5, rtol=0)

    ours = bundle.tokenizer([PROMPT] * 2, m)
    ids, slots, ids_2 = pipe.tokenizer([PROMPT] * 2, m)
    np.testing.assert_array_equal(ids.numpy(), ours.input_ids)
    np.testing.assert_array_equal(slots.numpy(), ours.slots)
    np.testing.assert_array_equal(ids_2.numpy(), ours.input_ids_2)
    assert (ids_2 != ids).any()  # tower 2 pads with its own id
    want = jax.jit(lambda mod, *a: mod.encode_text(*a))(
        model, ours.input_ids, ours.slots, words, ours.input_ids_2
    )
    with torch.no_grad():
        context, pooled = pipe._xl_text(ids, ids_2, slots, torch.from_numpy(np.array(words)))
    np.testing.assert_allclose(context.numpy(), np.asarray(want.context), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled.numpy(), np.asarray(want.pooled), atol=1e-5, rtol=0)
    # The words reach both towers: other words change both halves of the context.
    with torch.no_grad():
        other, _ = pipe._xl_text(ids, ids_2, slots, torch.from_numpy(np.array(words)) + 1.0)
    halves = torch.split(other - context, list(model.text_widths), dim=-1)
    assert all(h.abs().max() > 1e-3 for h in halves)


@pytest.mark.parametrize("uncond", ["base", "lora"])
def test_sdxl_pipeline_latents_equal_our_samplers_on_the_same_noise(xl_export, pipe, uncond):
    """DDIM + CFG (guidance 3, SDXL's zero unconditional text, our unconditional rule), 3 steps,
    two images from two references with identity tokens: the latents within 1e-4, and the
    decoded images too."""
    from pv_jax.sampling import Sampler, SamplerSpec
    from pv_jax.sampling.sampler import empty_prompt_ids

    bundle, _, _, _, refs, descs = xl_export
    m = bundle.config.words
    tokens = bundle.tokenizer([PROMPT] * 2, m)
    sampler = Sampler(bundle.model, bundle.schedule)
    noise = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
    kw = dict(
        num_words=m,
        spec=SamplerSpec(steps=3, uncond=uncond),
        input_ids_2=tokens.input_ids_2,
        descriptors=descs,
        guidance=3.0,
        gamma=1.0,
        sigma=0.7,
        alpha=0.8,
        **empty_prompt_ids(bundle.tokenizer),
    )
    args = (refs, tokens.input_ids, tokens.slots)
    want = sampler(*args, noise=noise, key=jax.random.key(0), decode=False, **kw)
    # The sampler's decode, outside it: one sampler program fewer to compile.
    images = nnx.jit(lambda vae, z: vae.decode_images(z))(bundle.model.vae, want)
    got = pipe(
        refs,
        PROMPT,
        noise=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2)),
        steps=3,
        guidance=3.0,
        gamma=1.0,
        sigma=0.7,
        alpha=0.8,
        uncond=uncond,
        descriptors=descs,
    )
    np.testing.assert_allclose(
        got.latents.numpy().transpose(0, 2, 3, 1), np.asarray(want), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(got.images, np.asarray(images), atol=1e-4, rtol=0)


def test_an_sdxl_export_refuses_an_sd_base_and_back(xl_export, pipe, tmp_path):
    """An SDXL export on SD 1.x components (or the reverse) fails naming the fix."""
    from photoverse_torch import PhotoVerseTorchPipeline, read_export

    _, path, folder, vision, _, _ = xl_export
    with pytest.raises(ValueError, match="trained on an SDXL base"):
        PhotoVerseTorchPipeline(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer.tokenizer,
            image_encoder=pipe.image_encoder,
            scheduler=pipe.scheduler,
            export=read_export(str(path)),
        )
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="has no text_encoder_2/"):
        PhotoVerseTorchPipeline.from_export(path, sd_folder=tmp_path, clip_vision_folder=vision)
