"""What the sampling command lines share beyond their flags (``options.py``): checking the
run and base folders before anything loads, and building the pipeline they ask for."""

from __future__ import annotations

import argparse
import os

from pv_jax.errors import MissingPathError
from pv_jax.paths import is_remote, run_path
from pv_jax.sampling.pipeline import PhotoVersePipeline


def check_model_args(args: argparse.Namespace) -> None:
    """Before anything is loaded: the run (``--ckpt``) and the base folders a command line
    names exist (nothing to check with ``--tiny``)."""
    if getattr(args, "tiny", False):
        return
    check_run_folders(args.ckpt, args.sd_folder, args.clip_vision_folder)


def check_run_folders(
    ckpt: str | os.PathLike, sd_folder: str | None = None, clip_vision_folder: str | None = None
) -> None:
    """The run's ``checkpoints/`` and the base folders named (``--sd-folder``,
    ``--clip-vision-folder``) exist; a MissingPathError naming the flag otherwise."""
    if not (run_path(ckpt) / "checkpoints").is_dir():
        raise MissingPathError(
            f"--ckpt {ckpt} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    for flag, folder in (
        ("--sd-folder", sd_folder),
        ("--clip-vision-folder", clip_vision_folder),
    ):
        if folder and not is_remote(folder) and not os.path.isdir(folder):
            raise MissingPathError(f"{flag} {folder}: no such folder")


def pipeline_from_args(args: argparse.Namespace) -> tuple[PhotoVersePipeline, str]:
    """The pipeline a command line asks for (``--tiny`` or ``--ckpt`` with optional base
    folders), and a description of its weights for the outputs."""
    if getattr(args, "tiny", False):
        from pv_jax.photoverse import tiny_photoverse

        weights = "tiny random networks, untrained: the images are noise by design"
        return PhotoVersePipeline(tiny_photoverse()), weights
    pipe = PhotoVersePipeline.from_checkpoint(
        args.ckpt, sd_folder=args.sd_folder, clip_vision_folder=args.clip_vision_folder
    )
    return pipe, f"trained checkpoint {args.ckpt}"
