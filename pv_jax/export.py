"""Export a trained PhotoVerse to one safetensors file that PyTorch / diffusers code can read.

    python -m pv_jax.export --ckpt DIR --out photoverse.safetensors [--step N] [--no-ema]

The file holds the run's trained weights (the EMA ones when the run kept them), in PyTorch's
layout (a Linear's ``weight`` is (out, in)), named after diffusers where it has an equivalent:

- the LoRA on the UNet's cross-attention projections in PEFT / diffusers naming,
  ``unet.<attention layer>.to_k.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank)
  (``to_q`` / ``to_v`` / ``to_out.0`` likewise), with PEFT's ``lora_adapter_metadata`` (rank,
  ``lora_alpha`` = rank: scale 1, our alpha is applied at call time), so that
  ``pipe.load_lora_weights({k: v for k, v in tensors.items() if "lora" in k})`` takes that part;
- the image branch's W_k^S, W_v^S of each cross-attention layer as IP-Adapter's
  ``to_k_ip`` / ``to_v_ip`` under its attention processor's name,
  ``unet.<attention layer>.processor.to_k_ip.weight`` (inner, context width);
- the adapters (text, image, identity) under ``photoverse.`` with our module paths
  (``photoverse.text_adapter.adapters.0.proj.weight``; LayerNorm scales as ``weight``).

The safetensors metadata holds ``photoverse_config`` (the model config: m, layers, adapter
widths, LoRA rank and targets, gamma / sigma / alpha, image-token source), ``photoverse_base``
(the base model the run trained on, with its noise schedule as the run read it: a diffusers
``DDIMScheduler`` config), ``photoverse_run`` (workdir, step, which weights) and
``photoverse_sampling`` (the run's tuned sampling settings). The file is written tensor by tensor
(``write_safetensors``); :func:`import_photoverse` reads it back into a model exactly.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from pv_jax.errors import InputError, MissingPathError, run_command
from pv_jax.paths import run_path
from pv_jax.photoverse import split_trainable

FORMAT = "pv_jax.photoverse/1"
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' key for the LoRA's PEFT config
LORA_MODULES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
IMAGE_BRANCH = {"to_k_s": "to_k_ip", "to_v_s": "to_v_ip"}
ADAPTER_PREFIX = "photoverse."


class ExportFileError(InputError):
    """A file that is not a pv_jax PhotoVerse export, or one that does not fit the model."""


def _flat(state: nnx.State) -> dict[str, np.ndarray]:
    """Our dotted parameter path -> array."""
    return {
        ".".join(str(k) for k in path): np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(state)
    }


def export_name(path: str) -> tuple[str, bool]:
    """Our trainable parameter's path -> (its name in the file, whether it is transposed)."""
    parts = path.split(".")
    leaf, owner = parts[-1], parts[-2]
    if parts[0] == "unet" and owner.startswith("lora_") and leaf in ("lora_a", "lora_b"):
        module = LORA_MODULES[owner.removeprefix("lora_")]
        factor = "lora_A" if leaf == "lora_a" else "lora_B"
        return ".".join([*parts[:-2], module, factor, "weight"]), True
    if parts[0] == "unet" and owner in IMAGE_BRANCH and leaf in ("kernel", "bias"):
        name = "weight" if leaf == "kernel" else "bias"
        return ".".join([*parts[:-2], "processor", IMAGE_BRANCH[owner], name]), leaf == "kernel"
    if parts[0] != "unet" and leaf in ("kernel", "scale", "bias"):
        name = "bias" if leaf == "bias" else "weight"
        return ADAPTER_PREFIX + ".".join([*parts[:-1], name]), leaf == "kernel"
    raise ValueError(f"no export name for the trainable parameter {path}")


def export_tensors(trainable: nnx.State) -> dict[str, np.ndarray]:
    """The trainable state as the file's tensors (PyTorch layout, float32)."""
    out = {}
    for path, value in _flat(trainable).items():
        name, transpose = export_name(path)
        out[name] = np.ascontiguousarray((value.T if transpose else value).astype(np.float32))
    return out


def _lora_metadata(config) -> dict[str, Any]:
    """PEFT's LoRA config of the UNet part, as diffusers reads it from the file's metadata."""
    targets = sorted({LORA_MODULES[t] for t in config.lora_targets})
    r = config.lora_rank
    return {"unet.r": r, "unet.lora_alpha": r, "unet.target_modules": targets}


def write_export(bundle, out: str | os.PathLike) -> dict[str, Any]:
    """Write a loaded run's trained weights (``load_trained``'s bundle) to ``out``; returns a
    summary (tensors, parameters, bytes, step, which weights, the metadata)."""
    from pv_jax.sampling.tuned import tuned_settings
    from pv_jax.weights.tensor_files import write_safetensors

    if bundle.source is None:
        raise ValueError("export a bundle that load_trained returned (it knows its run)")
    src = bundle.source
    _, trainable, _ = split_trainable(bundle.model)
    tensors = export_tensors(trainable)
    metadata = {
        "format": "pt",
        "pv_jax_format": FORMAT,
        "photoverse_config": json.dumps(bundle.config.to_dict()),
        # The noise schedule as the run read it (the folder's settings, ours for any it omits):
        # a diffusers DDIMScheduler config, so that a PyTorch sampler steps exactly as ours.
        "photoverse_base": json.dumps(
            src["base"] | {"is_xl": bundle.model.is_xl, "scheduler": bundle.schedule.to_diffusers()}
        ),
        "photoverse_run": json.dumps({k: src[k] for k in ("workdir", "step", "weights")}),
        "photoverse_sampling": json.dumps(tuned_settings(src["workdir"])),
        PEFT_METADATA: json.dumps(_lora_metadata(bundle.config)),
    }
    out = Path(out)
    write_safetensors(out, tensors, metadata)
    return {
        "out": str(out),
        "tensors": len(tensors),
        "parameters": int(sum(t.size for t in tensors.values())),
        "bytes": out.stat().st_size,
        "step": src["step"],
        "weights": src["weights"],
        "metadata": metadata,
    }


def export_photoverse(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    use_ema: bool = True,
) -> dict[str, Any]:
    """Write the run ``ckpt``'s trained weights (its latest step, or ``step``) to ``out``;
    returns :func:`write_export`'s summary."""
    from pv_jax.run_checkpoint import Checkpointer, load_trained

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: name the file *.safetensors")
    if not out.parent.is_dir():
        raise MissingPathError(f"--out {out}: the folder {out.parent} does not exist")
    if not (run_path(ckpt) / "checkpoints").is_dir():
        raise MissingPathError(
            f"--ckpt {ckpt} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    manager = Checkpointer(ckpt, every=1, keep=1_000_000)
    try:
        kept = sorted(manager.manager.all_steps())
    finally:
        manager.close()
    step = kept[-1] if step is None and kept else step
    if step is None or step not in kept:
        raise MissingPathError(
            f"--ckpt {ckpt} has no checkpoint at step {step}: it has {kept or 'none'}; "
            "pass one of them as --step (or none for the latest)"
        )
    return write_export(load_trained(ckpt, step=step, use_ema=use_ema), out)


def read_export(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of an export; a file of another kind fails naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportFileError(f"{path} is not a safetensors file ({e})") from e
    if metadata.get("pv_jax_format") != FORMAT:
        raise ExportFileError(
            f"{path} is not a pv_jax PhotoVerse export (no pv_jax_format={FORMAT!r} in its "
            "metadata): write one with python -m pv_jax.export --ckpt RUN --out FILE"
        )
    return tensors, metadata


def import_tensors(trainable: nnx.State, tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Set ``trainable`` (in place) from an export's tensors: every key must match, in shape."""
    expected = {}
    for path, var in nnx.to_flat_state(trainable):
        name, transpose = export_name(".".join(str(k) for k in path))
        expected[name] = (var, transpose)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ExportFileError(
            f"{where} does not fit this model: unknown keys {unknown[:3]}"
            f"{' ...' if len(unknown) > 3 else ''}, missing keys {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; load it onto the base model and config in "
            "its metadata (photoverse_base, photoverse_config)"
        )
    for name, (var, transpose) in expected.items():  # every shape first: fail changing nothing
        want = var.get_value().shape[::-1] if transpose else var.get_value().shape
        if tuple(tensors[name].shape) != tuple(want):
            raise ExportFileError(
                f"{where}: {name} has shape {tensors[name].shape}, the model wants {want}: "
                "another base model or config"
            )
    for name, (var, transpose) in expected.items():
        array = tensors[name].T if transpose else tensors[name]
        var.set_value(np.asarray(array, dtype=var.get_value().dtype))


def import_photoverse(model, path: str | os.PathLike) -> dict[str, str]:
    """Load an export's weights into ``model`` (a PhotoVerse built on the base and config of
    its metadata) in place; returns the file's metadata."""
    tensors, metadata = read_export(path)
    graphdef, trainable, frozen = split_trainable(model)
    import_tensors(trainable, tensors, str(path))
    nnx.update(model, trainable)
    return metadata


def main(argv: list[str] | None = None) -> dict:
    """``python -m pv_jax.export --ckpt DIR --out FILE``: write the export, print a summary."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pv_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a train_tpu.py workdir")
    p.add_argument("--out", required=True, help="the file to write, *.safetensors")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--no-ema", action="store_true", help="the raw trained weights even if EMA ones exist"
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    summary = export_photoverse(args.ckpt, args.out, step=args.step, use_ema=not args.no_ema)
    print(
        f"export: {summary['tensors']} tensors, {summary['parameters']:,} parameters "
        f"({summary['weights']} weights of step {summary['step']}) -> {summary['out']} "
        f"({summary['bytes'] / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s"
    )
    return summary


def cli(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line and exit status 2."""
    run_command("python -m pv_jax.export", main, argv)


if __name__ == "__main__":
    cli()
