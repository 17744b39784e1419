"""The PhotoVerse face dataset: a tfds builder writing array_record (no TensorFlow) and a grain
reader.

Writing: ``PhotoVerseFaces`` preprocesses a local folder of photos (``pv_jax.data.preprocess``)
and writes records whose images are PNG (or JPEG) bytes in ``Tensor(shape=(), dtype=object)``
features; ``tfds.features.Image`` would need TensorFlow to encode. Skipped files and the reason
go to ``skip_report.json`` next to the shards.

Resume: tfds cannot resume an interrupted generation (it writes into an ``incomplete.*`` folder
and starts over), so the expensive part, preprocessing, is checkpointed here: input files are
processed in fixed chunks, and each finished chunk's encoded records are kept under
``<data_dir>/<name>_work/``, keyed by a hash of the chunk's files (path, size, mtime) and the
config. A re-run reuses every finished chunk and only serialises them into the tfds shards again,
which costs a small fraction of preprocessing.

Reading: ``make_loader`` builds a ``grain.DataLoader`` over ``builder.as_data_source()`` with a
seeded shuffle, sharding by JAX process (or explicit index/count), PNG decoding and batching;
its iterator has ``get_state()`` / ``set_state()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import time
from collections import Counter
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from pv_jax.data.preprocess import FaceRecord, PreprocessConfig, Skip, preprocess_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SKIP_REPORT = "skip_report.json"
_IMAGE_KEYS = ("reference", "reference_mask", "target")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How records are written: shard count (None: tfds decides), resume chunk, image codec."""

    num_shards: int | None = None
    chunk_size: int = 256  # files per resumable preprocessing chunk
    image_format: str = "png"  # png is lossless; jpeg is ~5x smaller
    jpeg_quality: int = 95
    overwrite: bool = False  # rewrite the final tfds dataset (finished chunks are still reused)


def list_files(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Sorted relative paths under root: (image files, other files), hidden entries left out."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    return sorted(images), sorted(others)


def encode_image(array: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """PNG/JPEG bytes of an (H, W) or (H, W, 3) uint8 array."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)  # speed over size
    else:
        Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """uint8 array of PNG/JPEG bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def encode_record(record: FaceRecord, source: str, options: BuildOptions) -> dict[str, Any]:
    """The tfds example of a FaceRecord (images encoded, source relative to the input folder)."""
    example = {
        k: encode_image(getattr(record, k), options.image_format, options.jpeg_quality)
        for k in _IMAGE_KEYS
    }
    if options.image_format != "png":  # a lossy mask would no longer be {0, 1}
        example["reference_mask"] = encode_image(record.reference_mask, "png")
    example.update(
        landmarks=record.landmarks.astype(np.float32),
        descriptor=record.descriptor.astype(np.float32),
        face_box=record.face_box.astype(np.float32),
        num_faces=np.int32(record.num_faces),
        mask_source=record.mask_source,
        source=source,
    )
    return example


def decode_example(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """A stored example as arrays: images decoded to uint8, strings to str."""
    out = {k: decode_image(example[k]) for k in _IMAGE_KEYS}
    for k in ("landmarks", "descriptor", "face_box"):
        out[k] = np.asarray(example[k], np.float32)
    out["num_faces"] = np.int32(example["num_faces"])
    for k in ("mask_source", "source"):
        v = example[k]
        out[k] = v.decode() if isinstance(v, bytes) else str(v)
    return out


def _file_signature(path: str | None) -> list:
    if path is None:
        return [None]
    try:
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


class PhotoVerseFaces(tfds.core.GeneratorBasedBuilder):
    """Faces preprocessed for PhotoVerse from a local folder; nothing is downloaded."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Reference/target crops, 5 landmarks, mask, dlib descriptor."}

    def __init__(
        self,
        *,
        input_dir: str | os.PathLike | None = None,
        masks_dir: str | os.PathLike | None = None,
        preprocess_config: PreprocessConfig | None = None,
        options: BuildOptions | None = None,
        **kwargs: Any,
    ):
        self._input_dir = os.fspath(input_dir) if input_dir is not None else None
        self._masks_dir = os.fspath(masks_dir) if masks_dir is not None else None
        self._config = preprocess_config or PreprocessConfig()
        self._options = options or BuildOptions()
        self.report: dict[str, Any] | None = None  # set when this instance generated the data
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        encoded = tfds.features.Tensor(shape=(), dtype=np.object_)  # PNG/JPEG bytes
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(
                {
                    "reference": encoded,
                    "reference_mask": encoded,
                    "target": encoded,
                    "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
                    "descriptor": tfds.features.Tensor(shape=(128,), dtype=np.float32),
                    "face_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "num_faces": tfds.features.Scalar(dtype=np.int32),
                    "mask_source": tfds.features.Text(),
                    "source": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(preprocess=dataclasses.asdict(self._config)),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        if self._input_dir is None:
            raise ValueError("PhotoVerseFaces needs input_dir to build the dataset")
        return {"train": self._generate_examples()}

    @property
    def work_dir(self) -> str:
        """Where finished preprocessing chunks are kept for resuming."""
        return os.path.join(os.fspath(self.data_dir_root), f"{self.name}_work")

    def _mask_index(self) -> dict[str, str]:
        if self._masks_dir is None:
            return {}
        images, _ = list_files(self._masks_dir)
        return {os.path.splitext(rel)[0]: os.path.join(self._masks_dir, rel) for rel in images}

    def _chunk_key(self, chunk: list[str], masks: dict[str, str]) -> str:
        sig = [dataclasses.asdict(self._config), self._options.image_format]
        sig.append(self._options.jpeg_quality)
        for rel in chunk:
            sig.append(_file_signature(os.path.join(self._input_dir, rel)))
            sig.append(_file_signature(masks.get(os.path.splitext(rel)[0])))
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]

    def _process_chunk(self, chunk: list[str], masks: dict[str, str], bar: tqdm) -> dict:
        examples, skips = [], []
        for rel in chunk:
            mask_path = masks.get(os.path.splitext(rel)[0])
            out = preprocess_file(os.path.join(self._input_dir, rel), self._config, mask_path)
            if isinstance(out, Skip):
                skips.append({"source": rel, "reason": out.reason, "detail": out.detail})
            else:
                examples.append((rel, encode_record(out, rel, self._options)))
            bar.update(1)
        return {"examples": examples, "skips": skips}

    def _generate_examples(self):
        t0 = time.perf_counter()
        files, others = list_files(self._input_dir)
        masks = self._mask_index()
        size = max(1, self._options.chunk_size)
        chunks = [files[i : i + size] for i in range(0, len(files), size)]
        os.makedirs(self.work_dir, exist_ok=True)
        skips, reused, written = [], 0, 0
        with tqdm(total=len(files), desc="preprocess", unit="img") as bar:
            for i, chunk in enumerate(chunks):
                path = os.path.join(self.work_dir, f"chunk-{i:05d}-{self._chunk_key(chunk, masks)}")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        done = pickle.load(f)  # our own cache, written just below
                    reused += 1
                    bar.update(len(chunk))
                else:
                    done = self._process_chunk(chunk, masks, bar)
                    for old in os.listdir(self.work_dir):  # same index, other inputs: stale
                        if old.startswith(f"chunk-{i:05d}-"):
                            os.remove(os.path.join(self.work_dir, old))
                    with open(path + ".tmp", "wb") as f:
                        pickle.dump(done, f, protocol=pickle.HIGHEST_PROTOCOL)
                    os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a chunk
                skips.extend(done["skips"])
                written += len(done["examples"])
                yield from done["examples"]
        self.report = {
            "num_files": len(files),
            "num_written": written,
            "num_skipped": len(skips),
            "skipped_by_reason": dict(Counter(s["reason"] for s in skips)),
            "skipped": skips,
            "ignored_non_images": others,
            "num_chunks": len(chunks),
            "chunks_reused": reused,
            "chunks_computed": len(chunks) - reused,
            "preprocess_seconds": round(time.perf_counter() - t0, 3),
        }


def _check_same_config(dataset_dir: str, config: PreprocessConfig) -> None:
    """tfds reuses a finished dataset whatever the config: refuse one built differently."""
    path = os.path.join(dataset_dir, "metadata.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f).get("preprocess", {})
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as stored
    differ = sorted(k for k in wanted.keys() | stored.keys() if wanted.get(k) != stored.get(k))
    if differ:
        raise ValueError(
            f"{dataset_dir} was built with other preprocessing settings ({', '.join(differ)}); "
            "rebuild it with overwrite=True (--overwrite) or use another output folder"
        )


def build_dataset(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    config: PreprocessConfig | None = None,
    options: BuildOptions | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the dataset under output_dir; return the skip report plus its location."""
    config = config or PreprocessConfig()
    options = options or BuildOptions()
    builder = PhotoVerseFaces(
        data_dir=os.fspath(output_dir),
        input_dir=input_dir,
        masks_dir=masks_dir,
        preprocess_config=config,
        options=options,
    )
    if not options.overwrite:
        _check_same_config(builder.data_dir, config)
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if options.overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            num_shards=options.num_shards, download_mode=mode
        )
    )
    report_path = os.path.join(builder.data_dir, SKIP_REPORT)
    if builder.report is not None:
        with open(report_path, "w") as f:
            json.dump(builder.report, f, indent=1)
        report = builder.report
    else:  # the dataset was already complete: nothing was generated this time
        with open(report_path) as f:
            report = json.load(f)
        report = dict(report, chunks_reused=report["num_chunks"], chunks_computed=0)
    return dict(report, dataset_dir=builder.data_dir, report_path=report_path)


def load_source(data_dir: str | os.PathLike, split: str = "train"):
    """Random-access source of a built dataset (tfds ``as_data_source``, no TensorFlow)."""
    return PhotoVerseFaces(data_dir=os.fspath(data_dir)).as_data_source(split=split)


class DecodeExample(grain.transforms.Map):
    """grain map: a stored example -> arrays (see ``decode_example``)."""

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        return decode_example(element)


def make_loader(
    source: Any,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = False,
    worker_count: int = 0,
) -> grain.DataLoader:
    """A grain DataLoader: seeded shuffle, per-process shard, decode, batch; resumable iterator.

    Sharding defaults to this JAX process (``jax.process_index()`` of ``process_count()``);
    pass shard_index/shard_count to choose explicitly.
    """
    if shard_index is None and shard_count is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    else:
        shard_options = grain.sharding.ShardOptions(
            shard_index=shard_index or 0,
            shard_count=shard_count or 1,
            drop_remainder=drop_remainder,
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[DecodeExample(), grain.transforms.Batch(batch_size, drop_remainder)],
        worker_count=worker_count,
    )
