"""Training batches: this process's rows of each global batch, with tokenised prompts.

Two sources share one interface, an iterator with grain's checkpoint protocol (``get_state``
-> bytes, ``set_state(bytes)``, ``start_prefetch``), so that ``grain.checkpoint.CheckpointSave``
stores each process's position in the checkpoint and a resumed run sees the exact same data:

- :class:`RecordBatches`: the preprocessed face dataset (``pv_jax.data``), read with grain,
  sharded by JAX process, reshuffled every epoch, the target resized to the training resolution.
- :class:`SyntheticBatches`: random images and faces, a pure function of (seed, step, process),
  for smoke runs, tests and benchmarks.

Prompts come from ``data.prompts`` templates (each with the placeholder), picked per example.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from pv_jax.photoverse import PlaceholderTokenizer

# dlib's 5 landmarks (eye corners, nose) of a face centred in a unit target crop, as the
# preprocessing's 3x face-box target places it (x, y fractions of the crop size).
_SYNTHETIC_LANDMARKS = np.array(
    [[0.64, 0.42], [0.56, 0.42], [0.36, 0.42], [0.44, 0.42], [0.5, 0.56]], np.float32
)


class DataError(ValueError):
    """A dataset that cannot feed the configured run."""


def _tokens(
    tokenizer: PlaceholderTokenizer, prompts: Sequence[str], picks: np.ndarray, num_words: int
) -> dict[str, np.ndarray]:
    out = tokenizer([prompts[i] for i in picks], num_words)
    return {"input_ids": out.input_ids, "slots": out.slots}


class SyntheticBatches(Iterator[dict[str, np.ndarray]]):
    """Random reference/target images with a jittered face layout. Row r of global batch n is a
    function of (seed, n, r) only, so any number of processes sees the same global batches."""

    def __init__(
        self,
        tokenizer: PlaceholderTokenizer,
        prompts: Sequence[str],
        *,
        local_batch: int,
        resolution: int,
        reference_size: int = 224,
        num_words: int,
        seed: int = 0,
        process_index: int = 0,
    ):
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.local_batch, self.resolution = local_batch, resolution
        self.reference_size, self.num_words = reference_size, num_words
        self.seed, self.process_index = seed, process_index
        self.index = 0

    def _row(self, row: int) -> tuple:
        r = np.random.default_rng((self.seed, self.index, row))
        s, ref = self.resolution, self.reference_size
        lm = (_SYNTHETIC_LANDMARKS + r.uniform(-0.02, 0.02, (5, 2))) * s
        return (
            r.integers(0, 256, (ref, ref, 3), dtype=np.uint8),
            r.integers(0, 256, (s, s, 3), dtype=np.uint8),
            lm.astype(np.float32),
            int(r.integers(len(self.prompts))),
        )

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.process_index * self.local_batch
        refs, targets, lms, picks = zip(
            *(self._row(first + i) for i in range(self.local_batch)), strict=True
        )
        self.index += 1
        return {
            "reference": np.stack(refs),
            "target": np.stack(targets),
            "landmarks": np.stack(lms),
            **_tokens(self.tokenizer, self.prompts, np.asarray(picks), self.num_words),
        }

    def get_state(self) -> bytes:
        """Position in the stream (JSON)."""
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from a :meth:`get_state` value."""
        self.index = int(json.loads(state)["index"])

    def start_prefetch(self) -> None:
        """Nothing to prefetch (grain's checkpoint handler calls this after a restore)."""


def resize_target(image: np.ndarray, landmarks: np.ndarray, size: int):
    """Resize a square target crop to ``size`` and scale its landmarks with it."""
    h = image.shape[0]
    if h == size:
        return image, landmarks
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    # Pixel centres: x' + 0.5 = (x + 0.5) * size / h.
    return out, (landmarks + 0.5) * (size / h) - 0.5


class RecordBatches(Iterator[dict[str, np.ndarray]]):
    """The preprocessed face dataset through grain, endlessly, in this process's shard."""

    def __init__(
        self,
        data_dir: str,
        tokenizer: PlaceholderTokenizer,
        prompts: Sequence[str],
        *,
        local_batch: int,
        resolution: int,
        num_words: int,
        seed: int = 0,
        worker_count: int = 0,
        split: str = "train",
    ):
        from pv_jax.data.dataset import load_source, make_loader

        try:
            source = load_source(data_dir, split)
        except Exception as e:  # tfds raises several kinds for a missing/foreign folder
            raise DataError(
                f"data.data_dir={data_dir!r} holds no built PhotoVerse face dataset ({e}); "
                "build one with `python -m pv_jax.data.preprocess`, or set data.source="
                "'synthetic'"
            ) from e
        if len(source) == 0:
            raise DataError(f"the dataset in {data_dir!r} is empty: no {split} examples")
        self.tokenizer, self.prompts = tokenizer, list(prompts)
        self.resolution, self.num_words, self.seed = resolution, num_words, seed
        self.loader = make_loader(
            source,
            local_batch,
            seed=seed,
            num_epochs=None,
            drop_remainder=True,
            worker_count=worker_count,
        )
        self.iterator = iter(self.loader)
        self.count = 0

    def __next__(self) -> dict[str, np.ndarray]:
        ex = next(self.iterator)
        targets, lms = zip(
            *(
                resize_target(img, lm, self.resolution)
                for img, lm in zip(ex["target"], ex["landmarks"], strict=True)
            ),
            strict=True,
        )
        r = np.random.default_rng((self.seed, self.count))
        self.count += 1
        picks = r.integers(len(self.prompts), size=len(targets))
        return {
            "reference": ex["reference"],
            "target": np.stack(targets),
            "landmarks": np.stack(lms).astype(np.float32),
            "descriptor": ex["descriptor"],
            **_tokens(self.tokenizer, self.prompts, picks, self.num_words),
        }

    def get_state(self) -> bytes:
        """Position (JSON): grain's iterator state and the prompt counter."""
        return json.dumps(
            {"grain": self.iterator.get_state().decode(), "count": self.count}
        ).encode()

    def set_state(self, state: bytes) -> None:
        """Continue from a :meth:`get_state` value."""
        d = json.loads(state)
        self.iterator.set_state(d["grain"].encode())
        self.count = int(d["count"])

    def start_prefetch(self) -> None:
        """grain's checkpoint handler calls this after a restore; the loader prefetches itself."""
