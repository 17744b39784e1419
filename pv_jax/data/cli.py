"""The dataset-building command: preprocess a folder of photos into the array_record dataset.

    python -m pv_jax.data --input DIR [--masks DIR] --output DIR [--workers N]
    python -m pv_jax.data --input DIR --output DIR --beam "--runner=DataflowRunner ..."

(``python -m pv_jax.data.preprocess`` runs the same command.) Per-photo work is
``preprocess.py``'s, the dataset (chunks, skip report, tfds builder, grain loader) ``dataset.py``'s.
"""

from __future__ import annotations

import argparse
import shlex
import time

from pv_jax.data.dataset import BuildOptions, build_dataset
from pv_jax.data.preprocess import PreprocessConfig


def main(argv: list[str] | None = None) -> int:
    """Build the array_record dataset from a folder and print a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder of photos (searched recursively)")
    p.add_argument("--masks", default=None, help="parsing masks with the photos' relative stems")
    p.add_argument("--output", required=True, help="tfds data_dir to write into")
    p.add_argument("--mask", default=None, choices=["ellipse", "dataset", "none"])
    p.add_argument("--upsample", type=int, default=PreprocessConfig.upsample)
    p.add_argument("--reference-size", type=int, default=PreprocessConfig.reference_size)
    p.add_argument("--target-size", type=int, default=PreprocessConfig.target_size)
    p.add_argument("--pad-mode", default=PreprocessConfig.pad_mode, choices=["constant", "edge"])
    p.add_argument("--min-side", type=int, default=PreprocessConfig.min_side)
    p.add_argument("--max-megapixels", type=float, default=PreprocessConfig.max_megapixels)
    p.add_argument("--num-shards", type=int, default=BuildOptions.num_shards)
    p.add_argument("--chunk-size", type=int, default=BuildOptions.chunk_size)
    p.add_argument("--image-format", default=BuildOptions.image_format, choices=["png", "jpeg"])
    p.add_argument("--overwrite", action="store_true", help="rewrite the final dataset")
    p.add_argument(
        "--workers", type=int, default=BuildOptions.workers, help="processes (0: every core)"
    )
    p.add_argument(
        "--beam",
        default=None,
        metavar="FLAGS",
        help="generate with Apache Beam instead, e.g. '--runner=DirectRunner "
        "--direct_num_workers=8 --direct_running_mode=multi_processing' or a Dataflow runner",
    )
    args = p.parse_args(argv)

    config = PreprocessConfig(
        mask=args.mask or ("dataset" if args.masks else "ellipse"),
        upsample=args.upsample,
        reference_size=args.reference_size,
        target_size=args.target_size,
        pad_mode=args.pad_mode,
        min_side=args.min_side,
        max_megapixels=args.max_megapixels,
    )
    options = BuildOptions(
        num_shards=args.num_shards,
        chunk_size=args.chunk_size,
        image_format=args.image_format,
        overwrite=args.overwrite,
        workers=args.workers,
        beam=tuple(shlex.split(args.beam)) if args.beam is not None else None,
    )
    t0 = time.perf_counter()
    summary = build_dataset(args.input, args.output, args.masks, config, options)
    skipped = " ".join(f"{k}={v}" for k, v in sorted(summary["skipped_by_reason"].items()))
    print(
        f"pv_jax.data: {summary['num_files']} files -> {summary['num_written']} records, "
        f"{summary['num_skipped']} skipped ({skipped or 'none'}), "
        f"{summary['chunks_reused']}/{summary['num_chunks']} chunks reused, "
        f"workers={summary.get('workers', '-')}, "
        f"{time.perf_counter() - t0:.1f} s -> {summary['dataset_dir']}"
    )
    return 0
