"""CLIP text and vision towers: parity with transformers (PyTorch) on tiny random configs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    TINY_CLIP_TEXT,
    TINY_CLIP_VISION,
    apply,
    perturb_,
    to_nchw,
    to_nhwc,
    torch_source,
)
from transformers import CLIPTextConfig as TorchTextConfig
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers import CLIPVisionConfig as TorchVisionConfig

from pv_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    encode_prompt_states,
    preprocess_images,
)
from pv_jax.models.layers import abstract_module
from pv_jax.weights.convert import (
    CLIP_IGNORE,
    CLIP_RULES,
    CLIP_TEXT_STRIP_PREFIXES,
    CLIP_VISION_STRIP_PREFIXES,
    WeightImportError,
    export_state,
    load_into,
)

# Achieved fp32 max-abs error vs transformers: text last_hidden_state 1.1e-6, hidden states
# 7.2e-7, pooled 9.5e-7, text_embeds 4.5e-7; vision hidden states and image_embeds 7.2e-7.
TOL = 1e-4


def _text_pair(act: str, eos: int, prefixed: bool, dtype=jnp.float32):
    torch.manual_seed(0)
    cfg = TorchTextConfig(
        **TINY_CLIP_TEXT,
        hidden_act=act,
        projection_dim=8,
        eos_token_id=eos,
    )
    ref = perturb_(CLIPTextModelWithProjection(cfg))
    src = torch_source(ref)
    # transformers 5 writes the prefix for *WithProjection; SD folders always have it.
    src = {
        (k if prefixed or not k.startswith("text_model.") else k[len("text_model.") :]): v
        for k, v in src.items()
    }
    ours_cfg = CLIPTextConfig.from_hf(cfg.to_dict())
    abstract = abstract_module(
        lambda r: CLIPTextModel(ours_cfg, with_projection=True, dtype=dtype, rngs=r)
    )
    ours = load_into(
        abstract,
        src,
        CLIP_RULES,
        what="CLIP text",
        strip_prefixes=CLIP_TEXT_STRIP_PREFIXES,
        ignore=CLIP_IGNORE,
    )
    return ref, ours


def _ids(eos_id: int) -> np.ndarray:
    ids = np.random.RandomState(0).randint(3, 900, (2, 16))
    ids[0, 10] = ids[1, 5] = eos_id
    return ids


@pytest.mark.parametrize(
    "act,eos,prefixed",
    [("quick_gelu", 2, True), ("gelu", 999, False)],
    ids=["sd1-legacy-eos-prefixed", "sd2-gelu-eos-unprefixed"],
)
def test_parity_clip_text(act, eos, prefixed):
    ref, ours = _text_pair(act, eos, prefixed)
    ids = _ids(999)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = apply(ours, ids)
    chex.assert_shape(got.last_hidden_state, (2, 16, 32))
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL)
    np.testing.assert_allclose(
        np.asarray(got.last_hidden_state), want.last_hidden_state.numpy(), atol=TOL
    )
    np.testing.assert_allclose(np.asarray(got.text_embeds), want.text_embeds.numpy(), atol=TOL)
    # clip_skip: an earlier layer through the final LayerNorm, as diffusers' pipelines do.
    with torch.no_grad():
        skip = ref.text_model.final_layer_norm(want.hidden_states[-2]).numpy()
    np.testing.assert_allclose(np.asarray(encode_prompt_states(ours, ids, -2)), skip, atol=TOL)


def test_clip_text_inputs_embeds_replaces_lookup():
    _, ours = _text_pair("quick_gelu", 2, True)
    ids = _ids(999)
    emb = ours.embed_tokens(ids)
    a = apply(ours, ids)
    b = jax.jit(lambda m, i, e: m(i, inputs_embeds=e))(ours, ids, emb)
    np.testing.assert_allclose(np.asarray(a.last_hidden_state), np.asarray(b.last_hidden_state))
    c = jax.jit(lambda m, i, e: m(i, inputs_embeds=e))(ours, ids, emb.at[:, 3].set(0.0))
    assert np.abs(np.asarray(c.last_hidden_state) - np.asarray(a.last_hidden_state)).max() > 1e-3


def test_clip_text_bf16_close():
    ref, ours32 = _text_pair("quick_gelu", 2, True)
    _, ours16 = _text_pair("quick_gelu", 2, True, dtype=jnp.bfloat16)
    ids = _ids(999)
    a = np.asarray(apply(ours32, ids).last_hidden_state, np.float32)
    b = np.asarray(apply(ours16, ids).last_hidden_state, np.float32)
    assert np.isfinite(b).all() and np.abs(a - b).max() < 0.1 * np.abs(a).max()


def _vision_pair():
    torch.manual_seed(0)
    cfg = TorchVisionConfig(**TINY_CLIP_VISION)
    ref = perturb_(CLIPVisionModelWithProjection(cfg))
    abstract = abstract_module(
        lambda r: CLIPVisionModel(
            CLIPVisionConfig.from_hf(cfg.to_dict()), with_projection=True, rngs=r
        )
    )
    ours = load_into(
        abstract,
        torch_source(ref),
        CLIP_RULES,
        what="CLIP vision",
        strip_prefixes=CLIP_VISION_STRIP_PREFIXES,
        ignore=CLIP_IGNORE,
    )
    return ref, ours


def test_parity_clip_vision():
    ref, ours = _vision_pair()
    px = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(px), output_hidden_states=True)
    got = apply(ours, jnp.asarray(to_nhwc(px)))
    chex.assert_shape(got.last_hidden_state, (2, 17, 32))
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(got.image_embeds), want.image_embeds.numpy(), atol=TOL)
    # transformers' image_embeds project the post-LN CLS state; check the pooled state directly.
    with torch.no_grad():
        pooled = ref.vision_model.post_layernorm(want.last_hidden_state[:, 0]).numpy()
    np.testing.assert_allclose(np.asarray(got.pooler_output), pooled, atol=TOL)


def test_clip_export_loads_into_transformers_strict():
    ref, ours = _vision_pair()
    fresh = CLIPVisionModelWithProjection(ref.config).eval()
    state = export_state(ours, CLIP_RULES)
    state = {
        (k if k.startswith("visual_projection") else "vision_model." + k): torch.from_numpy(v)
        for k, v in state.items()
    }
    fresh.load_state_dict(state, strict=True)
    px = torch.from_numpy(np.random.RandomState(1).randn(1, 3, 32, 32).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(
            fresh(px).image_embeds.numpy(), ref(px).image_embeds.numpy(), atol=1e-6
        )


def test_clip_missing_and_misshaped_keys():
    ref, _ = _vision_pair()
    cfg = CLIPVisionConfig.from_hf(ref.config.to_dict())
    src = torch_source(ref)
    del src["vision_model.post_layernorm.weight"]
    src["vision_model.embeddings.class_embedding"] = lambda: np.zeros(7, np.float32)
    with pytest.raises(WeightImportError) as e:
        load_into(
            abstract_module(lambda r: CLIPVisionModel(cfg, with_projection=True, rngs=r)),
            src,
            CLIP_RULES,
            what="CLIP vision",
            strip_prefixes=CLIP_VISION_STRIP_PREFIXES,
        )
    assert "post_layernorm.weight" in str(e.value) and "class_embedding: file (7,)" in str(e.value)


def test_preprocess_images_shape_and_normalisation():
    img = np.full((2, 300, 400, 3), 255, np.uint8)
    out = preprocess_images(img, size=224)
    chex.assert_shape(out, (2, 224, 224, 3))
    want = (1.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array(
        [0.26862954, 0.26130258, 0.27577711]
    )
    np.testing.assert_allclose(np.asarray(out)[0, 100, 100], want, atol=1e-4)


def test_parity_clip_text_pooler_first_eos_without_projection():
    # Padding with EOS after the first EOS: transformers 5 pools at the *first* EOS.
    from transformers import CLIPTextModel as TorchTextModel

    torch.manual_seed(1)
    cfg = TorchTextConfig(
        **TINY_CLIP_TEXT,
        eos_token_id=999,
    )
    ref = perturb_(TorchTextModel(cfg))
    abstract = abstract_module(
        lambda r: CLIPTextModel(CLIPTextConfig.from_hf(cfg.to_dict()), rngs=r)
    )
    ours = load_into(
        abstract,
        torch_source(ref),
        CLIP_RULES,
        what="CLIP text",
        strip_prefixes=CLIP_TEXT_STRIP_PREFIXES,
        ignore=CLIP_IGNORE,
    )
    ids = _ids(999)
    ids[0, 11:] = ids[1, 6:] = 999
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).pooler_output.numpy()
    got = apply(ours, ids)
    assert got.text_embeds is None
    # Achieved fp32 max-abs error: 9.5e-7.
    np.testing.assert_allclose(np.asarray(got.pooler_output), want, atol=TOL)


def test_clip_config_from_full_clip_config_and_back():
    from transformers import CLIPConfig

    full = CLIPConfig(projection_dim=64).to_dict()
    text, vision = CLIPTextConfig.from_hf(full), CLIPVisionConfig.from_hf(full)
    assert text.projection_dim == vision.projection_dim == 64
    assert CLIPTextConfig.from_hf(TorchTextConfig(**text.to_hf()).to_dict()) == text
    assert CLIPVisionConfig.from_hf(TorchVisionConfig(**vision.to_hf()).to_dict()) == vision
    for bad in ({"hidden_act": "gelu_new"}, {"attention_dropout": 0.1}, {"model_type": "siglip"}):
        with pytest.raises(ValueError):
            CLIPTextConfig.from_hf(bad)


def test_preprocess_images_close_to_clip_image_processor():
    from PIL import Image
    from transformers import CLIPImageProcessor

    # A photo-like (smooth) image; PIL's uint8 rounding between passes differs on white noise.
    small = (np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((400, 300), Image.BICUBIC))
    want = CLIPImageProcessor()(images=[img], return_tensors="np")["pixel_values"]
    got = to_nchw(preprocess_images(img[None]))
    # Achieved max-abs 0.016 (about one grey level after CLIP's std normalisation).
    np.testing.assert_allclose(got, want, atol=0.03)
