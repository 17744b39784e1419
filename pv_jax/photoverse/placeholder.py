"""Placeholder prompts: tokenise "a photo of S* ..." and inject the pseudo-words S1..Sm.

Textual-Inversion style (SPEC.md): the placeholder token is added to the CLIP tokenizer; on the
host each occurrence is expanded to m slots (the sequence grows by m - 1 and is cut/padded to
the model length); on the device the word embeddings at those slots are replaced by S1..Sm
before the text transformer. Slots are data (an int array), so a batch may hold the placeholder
at a different position in every prompt and everything stays jittable.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pv_jax.errors import PromptError
from pv_jax.models.clip import CLIPTextModel, encode_prompt_states

# How a Python caller asks for the missing placeholder to be appended (command lines name their
# flag instead, see ``pv_jax.sampling.options``).
APPEND_OPTION = "set missing_placeholder='append'"


def has_placeholder(prompt: str, placeholder: str = "S*") -> bool:
    """Whether ``prompt`` holds the placeholder (case-insensitive, as the CLIP tokenizer)."""
    return placeholder.lower() in prompt.lower()


def missing_placeholder_error(
    prompt: str, placeholder: str, append_text: str, append_option: str = APPEND_OPTION
) -> PromptError:
    """The error for a prompt without the placeholder: names the prompt and both fixes."""
    return PromptError(
        f"prompt {prompt!r} has no placeholder {placeholder!r}: put it where the person goes, "
        f"e.g. 'a photo of {placeholder} as an astronaut' (or {append_option} to add "
        f"{append_text!r})"
    )


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """Tokenised placeholder prompts, ready for :func:`encode_prompts`.

    ``input_ids``: (B, L) int32 ids for the text model; each slot holds the tokenizer's BOS id as
    a stand-in (its embedding is replaced, and BOS never becomes the pooled EOS position).
    ``slots``: (B, L) int32, ``k + 1`` where pseudo-word S_(k+1) goes, 0 elsewhere.
    ``input_ids_2``: SDXL's second tower's ids (the same tokens, padded with tokenizer 2's pad
    id: "!"), or None without a second tokenizer.
    """

    input_ids: np.ndarray
    slots: np.ndarray
    num_words: int
    input_ids_2: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a batch carries: ``input_ids``, ``slots`` and (SDXL) ``input_ids_2``."""
        out = {"input_ids": self.input_ids, "slots": self.slots}
        if self.input_ids_2 is not None:
            out["input_ids_2"] = self.input_ids_2
        return out


class PlaceholderTokenizer:
    """A CLIP tokenizer that knows the placeholder token and expands it into m slots.

    SDXL: ``tokenizer_2`` (the second tower's) must tokenise like the first (the same CLIP BPE)
    and only pad differently; its ids are the first tower's, padded with its own pad id.
    """

    def __init__(
        self,
        tokenizer,
        placeholder: str = "S*",
        *,
        max_length: int = 77,
        missing: str = "error",
        append_text: str = "a photo of S*",
        tokenizer_2=None,
    ):
        self.tokenizer = copy.deepcopy(tokenizer)  # adding a token must not change the caller's
        self.tokenizer.add_tokens([placeholder])
        self.tokenizer_2 = None
        self.pad_id_2 = None
        if tokenizer_2 is not None:
            self.tokenizer_2 = copy.deepcopy(tokenizer_2)
            self.tokenizer_2.add_tokens([placeholder])
            probe = f"a photo of {placeholder}, smiling"
            if self.tokenizer(probe).input_ids != self.tokenizer_2(probe).input_ids:
                raise ValueError(
                    "tokenizer_2 does not tokenise like tokenizer (SDXL's two tokenizers are the "
                    "same CLIP BPE and differ only in padding): check the model folder's "
                    "tokenizer/ and tokenizer_2/"
                )
            self.pad_id_2 = self.tokenizer_2.pad_token_id
        self.placeholder = placeholder
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        self.max_length = max_length
        self.missing = missing
        self.append_text = append_text
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.stand_in_id = self.tokenizer.bos_token_id

    def _ids(self, prompt: str, missing: str) -> list[int]:
        ids = self.tokenizer(prompt, truncation=False).input_ids
        if self.placeholder_id not in ids and missing == "append":
            appended = f"{prompt.rstrip().rstrip(',')}, {self.append_text}"
            ids = self.tokenizer(appended, truncation=False).input_ids
        if self.placeholder_id not in ids:
            raise missing_placeholder_error(prompt, self.placeholder, self.append_text)
        return ids

    def __call__(
        self, prompts: str | Sequence[str], num_words: int, *, missing: str | None = None
    ) -> PromptTokens:
        """Tokenise prompts, expanding every placeholder into ``num_words`` slots.

        ``missing``: "error" or "append" for a prompt without the placeholder (default: the
        tokenizer's own setting)."""
        if num_words < 1:
            raise ValueError(f"num_words must be >= 1, got {num_words}")
        missing = missing or self.missing
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.max_length
        ids = np.full((len(prompts), n), self.pad_id, np.int32)
        ids_2 = None if self.tokenizer_2 is None else np.full_like(ids, self.pad_id_2)
        slots = np.zeros((len(prompts), n), np.int32)
        for b, prompt in enumerate(prompts):
            row, row_slots = [], []
            for i in self._ids(prompt, missing):
                if i == self.placeholder_id:
                    row += [self.stand_in_id] * num_words
                    row_slots += range(1, num_words + 1)
                else:
                    row.append(i)
                    row_slots.append(0)
            if len(row) > n:  # CLIP's truncation: keep the first n - 1 tokens, then EOS
                if any(row_slots[n - 1 :]):
                    raise PromptError(
                        f"prompt {prompt!r} is too long: its placeholder {self.placeholder!r} "
                        f"(expanded to {num_words} pseudo-words) would be cut off by the "
                        f"{n}-token limit; shorten the prompt or move {self.placeholder!r} "
                        "nearer the start"
                    )
                row, row_slots = row[: n - 1] + [self.eos_id], row_slots[: n - 1] + [0]
            ids[b, : len(row)] = row
            slots[b, : len(row)] = row_slots
            if ids_2 is not None:
                ids_2[b, : len(row)] = row
        return PromptTokens(ids, slots, num_words, ids_2)

    def plain(self, prompts: str | Sequence[str], tower: int = 1) -> np.ndarray:
        """Ids (B, L) of prompts without placeholder handling (e.g. the empty CFG prompt), for
        text tower 1 or (SDXL) 2."""
        tokenizer = self.tokenizer if tower == 1 else self.tokenizer_2
        if tokenizer is None:
            raise ValueError(f"there is no tokenizer for text tower {tower}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True)
        return np.asarray(out.input_ids, np.int32)


def inject_pseudo_words(token_embeds: jax.Array, slots: jax.Array, words: jax.Array) -> jax.Array:
    """Replace the embeddings at the slots: (B, L, D), (B, L) slot ids, (B, m, D) -> (B, L, D)."""
    m = words.shape[1]
    idx = jnp.clip(slots - 1, 0, m - 1)
    gathered = jnp.take_along_axis(words, idx[..., None], axis=1).astype(token_embeds.dtype)
    return jnp.where((slots > 0)[..., None], gathered, token_embeds)


def encode_prompts(
    text_encoder: CLIPTextModel,
    input_ids: jax.Array,
    slots: jax.Array,
    words: jax.Array,
    layer: int = -1,
) -> jax.Array:
    """The UNet context (B, L, D) of placeholder prompts with pseudo-words ``words`` (B, m, D)."""
    embeds = inject_pseudo_words(text_encoder.embed_tokens(input_ids), slots, words)
    return encode_prompt_states(text_encoder, input_ids, layer, inputs_embeds=embeds)
