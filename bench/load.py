"""Benchmark: peak memory and time of importing an SD1.5-size UNet folder (safetensors).

    python bench/load.py                 # writes a random SD1.5 UNet folder once, then loads it
    python bench/load.py --folder DIR    # an existing diffusers unet/ folder
    python bench/load.py --export        # also write it back: save_unet against the old way

The import builds the NNX UNet abstractly and fills it tensor by tensor, so its peak resident
memory should stay near the size of the weights. The load runs in a fresh process so that the
figure is the importer's alone. Prints one JSON object with at least `weights_gib`,
`peak_rss_gib`, `baseline_rss_gib`, `load_s`.

``--export`` then writes the loaded UNet back to a folder, once with ``save_unet`` (tensors made
and written one at a time) and once, in another fresh process, the way it was written before
(``export_state``'s whole state dict, then ``safetensors.numpy.save_file``); each prints
`export_peak_over_loaded_gib`: the peak resident memory during the write (VmHWM, reset after the
load) minus the resident memory with the UNet loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import current_rss_gib, peak_rss_gib, reset_peak_rss


def _export(unet, writer: str, out: str) -> dict:
    """Write the loaded UNet with ``writer`` and measure the write's peak over the loaded RSS."""
    from safetensors.numpy import save_file

    from pv_jax.weights.convert import export_state
    from pv_jax.weights.hf_folders import save_unet

    loaded = current_rss_gib()
    reset_peak_rss()
    t0 = time.perf_counter()
    if writer == "stream":
        save_unet(unet, out)
    else:  # before: every tensor copied to torch layout, then save_file's bytes of each
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(export_state(unet), str(Path(out) / "diffusion_pytorch_model.safetensors"))
    return {
        "writer": writer,
        "loaded_rss_gib": round(loaded, 2),
        "export_peak_rss_gib": round(peak_rss_gib(), 2),
        "export_peak_over_loaded_gib": round(peak_rss_gib() - loaded, 2),
        "export_s": round(time.perf_counter() - t0, 1),
    }


def _load(folder: str, export: str | None = None, out: str | None = None) -> None:
    """Child process: import the libraries, note the baseline, load, print JSON."""
    import jax

    from pv_jax.weights.hf_folders import find_weights, load_unet

    jax.numpy.zeros(1).block_until_ready()  # initialise the backend before the baseline
    baseline = peak_rss_gib()
    t0 = time.perf_counter()
    unet = load_unet(folder)
    jax.block_until_ready(jax.tree.leaves(unet))
    load_s = time.perf_counter() - t0
    weights = sum(
        p.stat().st_size for p in find_weights(Path(folder), ("diffusion_pytorch_model",))
    )
    print(
        json.dumps(
            {
                "what": "SD1.5 UNet import",
                "weights_gib": round(weights / 2**30, 2),
                "baseline_rss_gib": round(baseline, 2),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "peak_minus_baseline_gib": round(peak_rss_gib() - baseline, 2),
                "load_s": round(load_s, 1),
                **(_export(unet, export, out) if export else {}),
            }
        )
    )


def main() -> None:
    """Write the folder if needed, then load it in a fresh process."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", help="diffusers unet folder (default: write a random SD1.5 one)")
    p.add_argument("--export", action="store_true", help="also time and measure the export")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--writer", choices=["stream", "save_file"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _load(args.folder, args.writer, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            import torch
            from diffusers import UNet2DConditionModel

            from pv_jax.models.unet import UNetConfig

            torch.manual_seed(0)
            folder = str(Path(tmp) / "unet")
            UNet2DConditionModel(**UNetConfig().to_diffusers()).save_pretrained(folder)
            print(f"wrote a random SD1.5 UNet to {folder}", file=sys.stderr)
        child = [sys.executable, __file__, "--child", "--folder", folder]
        if not args.export:
            subprocess.run(child, check=True)
            return
        for writer in ("stream", "save_file"):
            out = str(Path(tmp) / f"export_{writer}")
            subprocess.run([*child, "--writer", writer, "--out", out], check=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
