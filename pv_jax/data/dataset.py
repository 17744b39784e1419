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

Parallelism: chunks are the unit of work. On one host a process pool runs them on every core
(``BuildOptions.workers``); past one host tfds generates the dataset with Apache Beam
(``BuildOptions.beam``: DirectRunner locally, Dataflow / Spark / Flink at scale; the work folder
must then be storage every worker sees). Either way the records, the skip report (read back from
each chunk's meta file) and the resume are those of a single process.

Reading: ``make_loader`` builds a ``grain.DataLoader`` over ``builder.as_data_source()`` with a
seeded shuffle, sharding by JAX process (or explicit index/count), PNG decoding and batching;
its iterator has ``get_state()`` / ``set_state()``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import time
from collections import Counter
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tqdm import tqdm

from pv_jax.data.preprocess import FaceRecord, PreprocessConfig, Skip, preprocess_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
SKIP_REPORT = "skip_report.json"
_IMAGE_KEYS = ("reference", "reference_mask", "target")
# Stored from version 1.1.0 on (SDXL micro-conditioning); decode_example leaves them out of
# examples of older datasets.
GEOMETRY_KEYS = ("source_size", "target_box")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How records are written: shard count (None: tfds decides), resume chunk, image codec."""

    num_shards: int | None = None
    chunk_size: int = 256  # files per resumable preprocessing chunk
    image_format: str = "png"  # png is lossless; jpeg is ~5x smaller
    jpeg_quality: int = 95
    overwrite: bool = False  # rewrite the final tfds dataset (finished chunks are still reused)
    workers: int = 0  # preprocessing processes on this host; 0: every core
    # Apache Beam pipeline flags (e.g. ("--runner=DirectRunner", "--direct_num_workers=4",
    # "--direct_running_mode=multi_processing"), or a Dataflow/Spark/Flink runner): tfds then
    # generates the dataset with Beam, one chunk per element. None: the local process pool.
    beam: tuple[str, ...] | None = None


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
        source_size=np.asarray(record.source_size, np.int32),
        target_box=np.asarray(record.target_box, np.float32),
        num_faces=np.int32(record.num_faces),
        mask_source=record.mask_source,
        source=source,
    )
    return example


def decode_example(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """A stored example as arrays: images decoded to uint8, strings to str.

    ``source_size`` (2,) int32 and ``target_box`` (3,) float32 (see ``FaceRecord``) are there
    when the dataset stores them (version 1.1.0 on); an example of an older dataset has neither
    and nothing stands in for them here: ``pv_jax.train.data`` falls back (and says so)."""
    out = {k: decode_image(example[k]) for k in _IMAGE_KEYS}
    for k in ("landmarks", "descriptor", "face_box"):
        out[k] = np.asarray(example[k], np.float32)
    if all(k in example for k in GEOMETRY_KEYS):
        out["source_size"] = np.asarray(example["source_size"], np.int32)
        out["target_box"] = np.asarray(example["target_box"], np.float32)
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

    VERSION = tfds.core.Version("1.1.0")
    # Older datasets still load (``load_source`` picks the version found on disk).
    SUPPORTED_VERSIONS = [tfds.core.Version("1.0.0")]
    RELEASE_NOTES = {
        "1.0.0": "Reference/target crops, 5 landmarks, mask, dlib descriptor.",
        "1.1.0": "source_size (photo height, width) and target_box (top, left, side of the "
        "target square in photo pixels), for SDXL's size/crop micro-conditioning.",
    }

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
        features = {
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
        if self.version >= "1.1.0":  # an older dataset is read with the features it has
            features["source_size"] = tfds.features.Tensor(shape=(2,), dtype=np.int32)
            features["target_box"] = tfds.features.Tensor(shape=(3,), dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict(features),
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
        # The dataset version too: a chunk cached by another version has other fields.
        sig = [dataclasses.asdict(self._config), self._options.image_format, str(self.version)]
        sig.append(self._options.jpeg_quality)
        for rel in chunk:
            sig.append(_file_signature(os.path.join(self._input_dir, rel)))
            sig.append(_file_signature(masks.get(os.path.splitext(rel)[0])))
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]

    def _plan(self) -> list[Chunk]:
        """The input split into resumable chunks; stale chunks of other inputs are removed."""
        files, self._others = list_files(self._input_dir)
        masks = self._mask_index()
        size = max(1, self._options.chunk_size)
        os.makedirs(self.work_dir, exist_ok=True)
        existing = os.listdir(self.work_dir)
        chunks = []
        for i in range(0, len(files), size):
            rel = tuple(files[i : i + size])
            name = f"chunk-{i // size:05d}-{self._chunk_key(list(rel), masks)}"
            for old in existing:  # same index, other inputs or settings: stale
                if old.startswith(name[:12]) and old not in (name + ".pkl", name + ".json"):
                    os.remove(os.path.join(self.work_dir, old))
            mask_paths = tuple(masks.get(os.path.splitext(r)[0]) for r in rel)
            chunks.append(Chunk(os.path.join(self.work_dir, name), rel, mask_paths))
        return chunks

    def _generate_examples(self):
        self._t0 = time.perf_counter()
        self._chunks = self._plan()
        self._reused = sum(os.path.exists(c.meta_path) for c in self._chunks)
        job = ChunkJob(self._input_dir, self._config, self._options)
        if self._options.beam is not None:
            import apache_beam as beam

            # Each Beam worker preprocesses (or reuses) whole chunks; the report is read back
            # from the chunks' small meta files once the pipeline has finished.
            return beam.Create(self._chunks) | "preprocess" >> beam.FlatMap(job.examples)
        return self._generate_local(job)

    def _generate_local(self, job: ChunkJob):
        """Chunks in order, preprocessed by a process pool over this host's cores."""
        total = sum(len(c.files) for c in self._chunks)
        workers = min(resolve_workers(self._options.workers), max(1, len(self._chunks)))
        pool = None
        if workers > 1:
            # spawn: the parent may hold threads (tfds, grain) that fork would copy mid-state.
            ctx = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx)
        try:
            done = pool.map(job.run, self._chunks) if pool else map(job.run, self._chunks)
            with tqdm(total=total, desc=f"preprocess ({workers} proc)", unit="img") as bar:
                for chunk, _ in zip(self._chunks, done, strict=True):
                    bar.update(len(chunk.files))
                    yield from job.load(chunk)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def finish_report(self) -> dict[str, Any] | None:
        """The skip report of the generation this builder ran (None if it reused the dataset)."""
        if getattr(self, "_chunks", None) is None:
            return None
        metas = [c.read_meta() for c in self._chunks]
        skips = [s for m in metas for s in m["skips"]]
        self.report = {
            "num_files": sum(len(c.files) for c in self._chunks),
            "num_written": sum(m["num_written"] for m in metas),
            "num_skipped": len(skips),
            "skipped_by_reason": dict(Counter(s["reason"] for s in skips)),
            "skipped": skips,
            "ignored_non_images": self._others,
            "num_chunks": len(self._chunks),
            "chunks_reused": self._reused,
            "chunks_computed": len(self._chunks) - self._reused,
            "workers": "beam"
            if self._options.beam is not None
            else resolve_workers(self._options.workers),
            "preprocess_seconds": round(time.perf_counter() - self._t0, 3),
        }
        return self.report


def resolve_workers(workers: int) -> int:
    """Preprocessing processes: ``workers``, or every core this process may use when 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: every core), got {workers}")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A resumable unit of preprocessing: files, their masks, and where its result is kept."""

    path: str  # <work_dir>/chunk-<index>-<key>: .pkl (examples) and .json (meta, written last)
    files: tuple[str, ...]
    masks: tuple[str | None, ...]

    @property
    def meta_path(self) -> str:
        """The chunk's meta file; it exists only once the chunk is complete."""
        return self.path + ".json"

    def read_meta(self) -> dict[str, Any]:
        """Records written and files skipped by this (finished) chunk."""
        with open(self.meta_path) as f:
            return json.load(f)


@dataclasses.dataclass(frozen=True)
class ChunkJob:
    """Preprocess a chunk (or reuse its finished result): picklable for process pools and Beam."""

    input_dir: str
    config: PreprocessConfig
    options: BuildOptions

    def run(self, chunk: Chunk) -> dict[str, Any]:
        """Preprocess the chunk unless it is finished; return its meta."""
        if os.path.exists(chunk.meta_path):
            return chunk.read_meta()
        examples, skips = [], []
        for rel, mask_path in zip(chunk.files, chunk.masks, strict=True):
            out = preprocess_file(os.path.join(self.input_dir, rel), self.config, mask_path)
            if isinstance(out, Skip):
                skips.append({"source": rel, "reason": out.reason, "detail": out.detail})
            else:
                examples.append((rel, encode_record(out, rel, self.options)))
        meta = {"num_written": len(examples), "skips": skips}
        # Examples first, meta last, each by an atomic rename: a crash never leaves a chunk
        # that looks finished.
        _write_atomic(chunk.path + ".pkl", pickle.dumps(examples, pickle.HIGHEST_PROTOCOL))
        _write_atomic(chunk.meta_path, json.dumps(meta).encode())
        return meta

    def load(self, chunk: Chunk) -> list[tuple[str, dict[str, Any]]]:
        """The finished chunk's (key, example) pairs."""
        with open(chunk.path + ".pkl", "rb") as f:
            return pickle.load(f)  # our own cache, written by run()

    def examples(self, chunk: Chunk):
        """Beam: run the chunk, then yield its examples."""
        self.run(chunk)
        yield from self.load(chunk)


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


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
    resolve_workers(options.workers)  # a bad count fails before anything is written
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
    beam_options = None
    if options.beam is not None:
        beam_options = _beam_pipeline_options(options.beam)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            num_shards=options.num_shards, download_mode=mode, beam_options=beam_options
        )
    )
    report_path = os.path.join(builder.data_dir, SKIP_REPORT)
    if builder.finish_report() is not None:
        with open(report_path, "w") as f:
            json.dump(builder.report, f, indent=1)
        report = builder.report
    else:  # the dataset was already complete: nothing was generated this time
        with open(report_path) as f:
            report = json.load(f)
        report = dict(report, chunks_reused=report["num_chunks"], chunks_computed=0)
    return dict(report, dataset_dir=builder.data_dir, report_path=report_path)


def _beam_pipeline_options(flags: tuple[str, ...]):
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise ValueError(
            "BuildOptions.beam (--beam) needs Apache Beam: pip install 'pv-jax[beam]'"
        ) from e
    return PipelineOptions(list(flags))


def stored_version(data_dir: str | os.PathLike) -> str | None:
    """The newest dataset version that PhotoVerseFaces reads and that is built under data_dir
    (None when there is none)."""
    root = epath.Path(data_dir) / PhotoVerseFaces.name  # epath: gs:// too, as tfds
    built = [
        v
        for v in [PhotoVerseFaces.VERSION, *PhotoVerseFaces.SUPPORTED_VERSIONS]
        if (root / str(v) / "dataset_info.json").exists()
    ]
    return str(max(built)) if built else None


def load_source(data_dir: str | os.PathLike, split: str = "train"):
    """Random-access source of a built dataset (tfds ``as_data_source``, no TensorFlow): the
    newest version built there, so a dataset of an older version still loads."""
    version = stored_version(data_dir)
    return PhotoVerseFaces(data_dir=os.fspath(data_dir), version=version).as_data_source(
        split=split
    )


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
