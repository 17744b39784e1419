"""Placeholder prompts: tokenisation with S* expanded into m slots, errors, and injection."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pv_jax.models.clip import encode_prompt_states
from pv_jax.photoverse import (
    PlaceholderTokenizer,
    PromptError,
    encode_prompts,
    inject_pseudo_words,
)
from pv_jax.weights.hf_folders import load_tokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> PlaceholderTokenizer:
    return PlaceholderTokenizer(load_tokenizer(), "S*")


def test_placeholder_token_is_added_to_a_copy():
    base = load_tokenizer()
    pt = PlaceholderTokenizer(base, "S*")
    assert pt.placeholder_id == len(base) == 49408  # a new id after CLIP's vocabulary
    assert len(pt.tokenizer) == 49409 and len(base) == 49408  # the caller's is unchanged


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_slots_positions_and_lengths(tok, m):
    plain = tok.plain(["a photo of person as an astronaut"])[0]
    out = tok(["a photo of S* as an astronaut"], m)
    ids, slots = out.input_ids[0], out.slots[0]
    chex.assert_shape((out.input_ids, out.slots), (1, 77))
    assert out.num_words == m and ids.dtype == np.int32
    # [BOS, a, photo, of] then m slots, then the rest, EOS, padding (the SD 1.x pad is EOS).
    np.testing.assert_array_equal(slots[:4], 0)
    np.testing.assert_array_equal(slots[4 : 4 + m], np.arange(1, m + 1))
    assert not slots[4 + m :].any()
    np.testing.assert_array_equal(ids[:4], plain[:4])
    np.testing.assert_array_equal(ids[4 : 4 + m], BOS)  # stand-ins, replaced before the encoder
    np.testing.assert_array_equal(ids[4 + m : 8 + m], plain[5:9])  # as, an, astronaut, EOS
    assert ids[7 + m] == EOS and (ids[8 + m :] == tok.pad_id).all()
    # The sequence grew by m - 1 tokens relative to one token in the placeholder's place.
    assert int((ids != tok.pad_id).sum()) + 1 == int((plain != tok.pad_id).sum()) + m


def test_batch_with_placeholders_at_different_positions(tok):
    out = tok(["S* reading", "a photo of S*", "a painting of a tall S*, oil on canvas"], 3)
    starts = [int(np.argmax(row == 1)) for row in out.slots]
    assert starts == [1, 4, 6]
    for row, s in zip(out.slots, starts, strict=True):
        np.testing.assert_array_equal(row[s : s + 3], [1, 2, 3])
        assert (row > 0).sum() == 3


def test_two_placeholders_both_expand(tok):
    out = tok(["S* and S* at the beach"], 2)
    np.testing.assert_array_equal(out.slots[0, :7], [0, 1, 2, 0, 1, 2, 0])


def test_missing_placeholder_is_an_error_naming_the_prompt(tok):
    with pytest.raises(PromptError, match="'a photo of a dog'.*no placeholder 'S\\*'"):
        tok(["a photo of S*", "a photo of a dog"], 2)


def test_missing_placeholder_appended_by_option(tok):
    pt = PlaceholderTokenizer(load_tokenizer(), "S*", missing="append")
    out = pt(["an astronaut on the moon"], 2)
    want = pt(["an astronaut on the moon, a photo of S*"], 2)
    np.testing.assert_array_equal(out.input_ids, want.input_ids)
    assert out.slots.sum() == 3
    # Per call (the pipeline's SamplingOptions.missing_placeholder), either way round.
    np.testing.assert_array_equal(
        tok(["an astronaut on the moon"], 2, missing="append").slots, out.slots
    )
    with pytest.raises(PromptError, match="missing_placeholder='append'"):
        pt(["an astronaut on the moon"], 2, missing="error")


def test_placeholder_cut_off_by_length_is_an_error(tok):
    long_prefix = " ".join(["tall"] * 73)  # BOS + 73 words: the slots start at position 74
    with pytest.raises(PromptError, match="cut off by the 77-token limit"):
        tok([long_prefix + " S*"], 3)
    out = tok([long_prefix + " S*"], 2)  # positions 74, 75, then EOS at 76: fits exactly
    assert out.input_ids[0, 76] == EOS and list(out.slots[0, 74:76]) == [1, 2]


def test_long_prompt_truncated_after_the_placeholder(tok):
    out = tok(["a photo of S* " + "very " * 100 + "tall"], 5)
    assert out.input_ids[0, -1] == EOS and out.slots.sum() == 15
    assert (out.input_ids[0] == EOS).sum() == 1


def test_inject_pseudo_words_per_sample():
    r = np.random.RandomState(0)
    emb = jnp.asarray(r.randn(2, 10, 8).astype(np.float32))
    words = jnp.asarray(r.randn(2, 3, 8).astype(np.float32))
    slots = np.zeros((2, 10), np.int32)
    slots[0, 2:5] = [1, 2, 3]
    slots[1, 6:9] = [1, 2, 3]
    out = np.asarray(inject_pseudo_words(emb, jnp.asarray(slots), words))
    np.testing.assert_array_equal(out[0, 2:5], words[0])
    np.testing.assert_array_equal(out[1, 6:9], words[1])
    keep = slots == 0
    np.testing.assert_array_equal(out[keep], np.asarray(emb)[keep])


def test_encode_prompts_replaces_embeddings_before_the_transformer(tiny_pv, tok):
    text = tiny_pv.model.text_encoder
    out = tok(["a photo of S* as an astronaut", "S* surfing"], 5)
    r = np.random.RandomState(1)
    words = jnp.asarray(r.randn(2, 5, text.config.hidden_size).astype(np.float32))
    encode = jax.jit(encode_prompts)
    got = encode(text, out.input_ids, out.slots, words)

    # Reference: the same sequence with the slot embeddings set by hand, through inputs_embeds.
    emb = np.array(jax.jit(lambda m, i: m.embed_tokens(i))(text, out.input_ids))
    for b, row in enumerate(out.slots):
        for pos in np.flatnonzero(row):
            emb[b, pos] = words[b, row[pos] - 1]
    want = jax.jit(lambda m, i, e: encode_prompt_states(m, i, inputs_embeds=e))(
        text, out.input_ids, emb
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    # Pseudo-words change the context from the slots on (causal attention), not before.
    other = encode(text, out.input_ids, out.slots, words * 2.0)
    np.testing.assert_array_equal(np.asarray(got)[0, :4], np.asarray(other)[0, :4])
    assert np.abs(np.asarray(got)[0, 4:] - np.asarray(other)[0, 4:]).max() > 1e-3
    # The pooled position is still the EOS token, not a stand-in slot.
    eos = jax.jit(lambda m, i: m.eos_index(i))(text, out.input_ids)
    np.testing.assert_array_equal(np.asarray(eos), [12, 7])
