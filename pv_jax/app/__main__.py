"""Serve the web app: ``python -m pv_jax.app --ckpt DIR --port N`` (``make serve``).

The model is loaded once at start-up; requests queue and run ``--concurrency`` at a time (1
suits a CPU). The sampling flags (``--num-images``, ``--steps``, ``--guidance``, ...) set what
the page starts from; unset, the tunable ones (``--guidance``, ``--eta``, ``--steps``, ...) take
the checkpoint's tuned values (``pv_jax.sampling.tuned``: ``tuning.json`` in the run folder or
the folder above it), else the library's defaults (guidance 7.5). Bad flags and a missing
checkpoint are one line on stderr and exit status 2, before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from pv_jax.app.handler import Limits, PhotoVerseApp
from pv_jax.errors import InputError, run_command
from pv_jax.sampling.cli import check_run_folders, pipeline_from_args
from pv_jax.sampling.options import add_sampling_args, options_from_args

# The embedded default: the toy model trained here (models/toy_faces, what `make demo` uses).
DEFAULT_CKPT = "models/toy_faces/photoverse"
_REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the checkpoint defaults to the toy model, found from any folder."""
    p = argparse.ArgumentParser(prog="python -m pv_jax.app", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help=f"a train_tpu.py workdir (default: {DEFAULT_CKPT})")
    p.add_argument("--sd-folder")
    p.add_argument("--clip-vision-folder")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--concurrency", type=int, default=1, help="requests run at once (default: %(default)s)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=64,
        help="requests that may wait; more are refused (0: no limit; default: %(default)s)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=Limits.max_upload_mb, help="per photo file (MiB)"
    )
    p.add_argument("--max-megapixels", type=float, default=Limits.max_megapixels, help="per photo")
    p.add_argument("--max-photos", type=int, default=Limits.max_photos)
    p.add_argument("--max-images", type=int, default=Limits.max_images, help="per request")
    p.add_argument("--max-steps", type=int, default=Limits.max_steps)
    add_sampling_args(p, num_images=4)
    args = p.parse_args(argv)
    if args.ckpt is None:
        local = Path(DEFAULT_CKPT)
        args.ckpt = str(local if local.exists() else _REPO / DEFAULT_CKPT)
    return args


def main(argv: list[str] | None = None) -> None:
    """Check the flags, load the model, build the page and serve it (blocks)."""
    args = parse_args(argv)
    defaults = options_from_args(args)
    for flag in ("concurrency", "max_photos", "max_images", "max_steps"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.queue_size < 0:
        raise InputError(f"--queue-size must be >= 0 (0: no limit), got {args.queue_size}")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise InputError("--max-upload-mb and --max-megapixels must be > 0")
    check_run_folders(args.ckpt, args.sd_folder, args.clip_vision_folder)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("pv_jax.app")

    from pv_jax.app.ui import CSS, build_ui  # gradio: imported once the flags are known good

    t0 = time.perf_counter()
    pipe, weights = pipeline_from_args(args)
    load_s = time.perf_counter() - t0
    log.info("loaded %s in %.1f s (%s)", args.ckpt, load_s, weights)
    limits = Limits(
        max_photos=args.max_photos,
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
        max_images=args.max_images,
        max_steps=args.max_steps,
    )
    app = PhotoVerseApp(pipe, defaults=defaults, limits=limits, model=args.ckpt, load_s=load_s)
    queue_size = args.queue_size or None
    demo = build_ui(app, concurrency=args.concurrency, queue_size=queue_size)
    demo.queue(max_size=queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        # Refused while uploading, before any decoding (the handler checks the size again).
        max_file_size=int(args.max_upload_mb * 2**20),
        ssr_mode=False,
        css=CSS,
    )


def cli(argv: list[str] | None = None) -> None:
    """The command: errors in the flags are one line on stderr and exit status 2."""
    run_command("python -m pv_jax.app", main, argv)


if __name__ == "__main__":
    cli()
