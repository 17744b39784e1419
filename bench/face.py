"""Benchmark: dlib face ResNet descriptors per second, ours (jitted JAX) vs dlib-bin, same chips.

    python bench/face.py                  # batch 1 and 32
    python bench/face.py --batch 64       # one setting

Chips: dlib's own 150x150 chips of every HOG detection in scikit-image's astronaut and
matplotlib's grace_hopper.jpg, with their mirror images, tiled to the batch size. Prints one JSON
object per batch size (keys: batch, ours_per_s, dlib_per_s, ratio, max_abs_diff, compile_s, ...).
dlib-bin runs a batch through ``compute_face_descriptor(list_of_chips)`` (its own 16-chip
mini-batches); both run float32 on the CPU unless JAX finds an accelerator.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import dlib
import jax
import jax.numpy as jnp
import numpy as np
import skimage.data
from common import compile_timed, median_time
from flax import nnx
from matplotlib import cbook
from PIL import Image

from pv_jax.face import default_weights_path, load_dlib_face_net
from pv_jax.face.dlib_format import SHAPE_PREDICTOR_5_FILE


def face_chips() -> np.ndarray:
    """(M, 150, 150, 3) uint8 dlib chips of the faces in the two sample photos, and mirrors."""
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(default_weights_path(SHAPE_PREDICTOR_5_FILE))
    hopper = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    chips = []
    for img in (np.asarray(skimage.data.astronaut()), hopper):
        for det in detector(img, 1):
            chips.append(dlib.get_face_chip(img, predictor(img, det), size=150, padding=0.25))
    chips += [c[:, ::-1] for c in chips]
    return np.ascontiguousarray(np.stack(chips))


def main() -> None:
    """Run the benchmark settings and print JSON lines."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, action="append", help="batch size (default: 1 and 32)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    t0 = time.perf_counter()
    graphdef, params = nnx.split(load_dlib_face_net())
    recognizer = dlib.face_recognition_model_v1(default_weights_path())
    pool = face_chips()
    print(
        f"loaded both nets and {len(pool)} chips in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    @jax.jit
    def forward(params, chips):
        return nnx.merge(graphdef, params)(chips)

    for batch in args.batch or [1, 32]:
        chips = np.ascontiguousarray(pool[np.arange(batch) % len(pool)])
        x = jnp.asarray(chips, jnp.float32)
        compiled, lower_s, compile_s = compile_timed(forward, params, x)
        compile_s += lower_s
        ours = np.asarray(compiled(params, x))  # warm-up
        ours_s = median_time(args.repeats, compiled, params, x)

        # One chip, or a list of chips (dlib's batched call), as a user would call it.
        dlib_input = chips[0] if batch == 1 else list(chips)

        def run_dlib(dlib_input=dlib_input, batch=batch):
            out = recognizer.compute_face_descriptor(dlib_input)
            return np.asarray([out] if batch == 1 else [np.asarray(d) for d in out])

        ref = run_dlib().reshape(batch, -1)
        dlib_s = median_time(args.repeats, run_dlib)
        row = {
            "batch": batch,
            "ours_per_s": round(batch / ours_s, 1),
            "dlib_per_s": round(batch / dlib_s, 1),
            "ratio": round(dlib_s / ours_s, 2),
            "max_abs_diff": float(np.abs(ours - ref).max()),
            "compile_s": round(compile_s, 2),
            "device": jax.devices()[0].device_kind,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
