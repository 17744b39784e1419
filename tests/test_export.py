"""pv_jax.export: a trained run to one safetensors file: exact round trip, the LoRA part loads
into diffusers' UNet (through PEFT) and gives our UNet's output, bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pv_jax.errors import InputError, MissingPathError
from pv_jax.export import (
    ExportFileError,
    export_photoverse,
    import_photoverse,
    main,
    read_export,
)
from pv_jax.photoverse import split_trainable

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models/toy_faces/photoverse"  # the released toy run (LoRA rank 4 on k, v)


@pytest.fixture(scope="module")
def exported(toy_export):
    """(path, the metadata's run part, our bundle) of the shared toy export."""
    bundle, out = toy_export
    return out, json.loads(read_export(out)[1]["photoverse_run"]), bundle


def test_export_round_trips_exactly_with_its_config(exported):
    out, run, bundle = exported
    tensors, metadata = read_export(out)
    assert run["step"] == 5000 and run["workdir"].endswith("models/toy_faces/photoverse")
    assert json.loads(metadata["photoverse_config"]) == bundle.config.to_dict()
    assert json.loads(metadata["photoverse_run"])["weights"] == bundle.source["weights"]
    tuned = json.loads((TOY / "tuning.json").read_text())
    sampling = json.loads(metadata["photoverse_sampling"])  # the run's tuning
    assert (sampling["guidance"], sampling["eta"]) == (tuned["guidance"], tuned["eta"])
    assert json.loads(metadata["lora_adapter_metadata"]) == {
        "unet.r": 4,
        "unet.lora_alpha": 4,
        "unet.target_modules": ["to_k", "to_v"],
    }
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = bundle.model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    np.testing.assert_array_equal(
        tensors[f"{layer}.processor.to_k_ip.weight"], np.asarray(attn.to_k_s.kernel.get_value()).T
    )
    np.testing.assert_array_equal(
        tensors[f"{layer}.to_v.lora_B.weight"], np.asarray(attn.lora_v.lora_b.get_value()).T
    )
    # Into a model whose trainable weights are something else: the file's, exactly.
    fresh = nnx.clone(bundle.model)
    _, before, _ = split_trainable(fresh)
    nnx.update(fresh, jax.tree.map(lambda x: x + 1.0, before))
    import_photoverse(fresh, out)
    _, want, _ = split_trainable(bundle.model)
    _, got, _ = split_trainable(fresh)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_lora_part_loads_into_diffusers_and_matches_our_unet(exported):
    """diffusers' UNet of the toy base + the file's LoRA keys (PEFT, scale 1) == our UNet with
    the text branch alone at alpha 1, fp32, within 1e-4; without the LoRA it differs."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    out, _, bundle = exported
    tensors, _ = read_export(out)
    base_unet = Path(bundle.source["base"]["sd_folder"]) / "unet"  # the run's base
    unet = TorchUNet.from_pretrained(str(base_unet)).eval()
    r = np.random.RandomState(0)
    x = r.randn(2, 8, 8, unet.config.in_channels).astype(np.float32)
    ctx = r.randn(2, 77, unet.config.cross_attention_dim).astype(np.float32)
    t = np.array([50, 700])

    def torch_out() -> np.ndarray:
        with torch.no_grad():
            y = unet(
                torch.from_numpy(x.transpose(0, 3, 1, 2)),
                torch.from_numpy(t),
                torch.from_numpy(ctx),
            )
        return y.sample.numpy().transpose(0, 2, 3, 1)

    base = torch_out()
    lora = {k: torch.from_numpy(v) for k, v in tensors.items() if "lora" in k}
    layers = [k for k in tensors if k.endswith("to_k_ip.weight")]
    assert len(lora) == 4 * len(layers) > 0  # A and B on to_k and to_v of every layer
    unet.load_lora_adapter(lora, prefix="unet", adapter_name="photoverse")
    with_lora = torch_out()
    graphdef, state = nnx.split(bundle.model.unet)
    kwargs = dict(image_tokens=None, gamma=1.0, sigma=0.0, alpha=1.0)
    run = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, cross_attention_kwargs=kwargs))
    ours = np.asarray(run(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    np.testing.assert_allclose(with_lora, ours, atol=1e-4, rtol=0)
    assert np.abs(base - ours).max() > 1e-3  # the trained LoRA matters at this tolerance


def test_bad_input_is_one_line_naming_the_fix(exported, tmp_path, capsys):
    out, _, _ = exported
    with pytest.raises(MissingPathError, match="has no checkpoints/: pass the --workdir"):
        export_photoverse(tmp_path, tmp_path / "x.safetensors")
    with pytest.raises(MissingPathError, match=r"no checkpoint at step 7: it has \[.*5000\]"):
        export_photoverse(TOY, tmp_path / "x.safetensors", step=7)
    with pytest.raises(InputError, match=r"name the file \*.safetensors"):
        export_photoverse(TOY, tmp_path / "x.bin")
    other = ROOT / "models/toy_faces/sd/unet/diffusion_pytorch_model.safetensors"
    with pytest.raises(ExportFileError, match="is not a pv_jax PhotoVerse export"):
        read_export(other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ExportFileError, match="is not a safetensors file"):
        read_export(tmp_path / "junk.safetensors")
    # An unknown key (a file written for another model) is named; the model is left as it was.
    from pv_jax.weights.tensor_files import write_safetensors

    tensors, metadata = read_export(out)
    extra = tmp_path / "extra.safetensors"
    write_safetensors(
        extra, {**tensors, "photoverse.mystery.weight": np.zeros(3, np.float32)}, metadata
    )
    model = nnx.clone(exported[2].model)
    _, before, _ = split_trainable(model)
    before = jax.tree.map(np.asarray, before)
    with pytest.raises(ExportFileError, match=r"unknown keys \['photoverse.mystery.weight'\]"):
        import_photoverse(model, extra)
    _, after, _ = split_trainable(model)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    # The command line: one line on stderr, exit status 2.
    from pv_jax.export import cli

    with pytest.raises(SystemExit) as e:
        cli(["--ckpt", str(tmp_path), "--out", str(tmp_path / "y.safetensors")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no checkpoints/" in err[0]
    summary = main(["--ckpt", str(TOY), "--out", str(tmp_path / "z.safetensors")])
    assert summary["step"] == 5000 and summary["tensors"] == len(tensors)
    assert read_export(tmp_path / "z.safetensors")[0].keys() == tensors.keys()
