"""`make demo` (python -m pv_jax.smoke) runs end to end and writes its outputs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pv_jax import smoke


def test_smoke_demo_writes_image_and_summary(tmp_path):
    summary = smoke.main(["--steps", "2", "--out", str(tmp_path)])
    img = np.asarray(Image.open(tmp_path / "smoke.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img.std() > 0  # not a blank image
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved == summary and saved["steps"] == 2 and "untrained" in saved["weights"]
    # The tiny networks went through the diffusers-folder writer and reader.
    assert (tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "tiny-sd" / "model_index.json").is_file()
