"""Checks that need 8 fake CPU devices; run by tests/test_train.py in a subprocess (the device
count is fixed when JAX starts). Prints one JSON object with what it measured."""

from __future__ import annotations

import json
import os
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from configs import tiny  # noqa: E402
from pv_jax.run_checkpoint import Checkpointer  # noqa: E402
from pv_jax.train import sharding  # noqa: E402
from pv_jax.train.metrics import compiled_flops  # noqa: E402
from pv_jax.train.trainer import _face_sharding, setup  # noqa: E402

MESHES = [(1, 1), (8, 1), (4, 2), (2, 4)]
STEPS = 2


def spec_str(x) -> str:
    return str(tuple(x.sharding.spec))


def run_mesh(cfg, shape, mesh=None):
    data, fsdp = shape
    if mesh is None:
        mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
    run = setup(cfg, mesh)
    state = sharding.put_global(run.host_state, run.state_sh)
    losses = []
    for _ in range(STEPS):
        batch = sharding.put_batch(next(run.data), mesh)
        state, metrics = run.step(state, run.frozen, batch)
        losses.append(float(metrics["loss"]))
    params = {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(state.trainable)
    }
    return run, mesh, state, losses, params, batch


def main() -> None:
    cfg = tiny.get_config()
    # Two examples per device on the (8, 1) mesh: the face loss's sub-batch of 8 is then
    # sharded over the devices like the batch (trainer._face_sharding).
    cfg.train.batch_size = 16
    out = {"meshes": {}}
    ref_params = None
    for shape in MESHES:
        run, mesh, state, losses, params, batch = run_mesh(cfg, shape)
        if ref_params is None:
            ref_params, ref_losses = params, losses
        diff = max(float(np.abs(params[k] - ref_params[k]).max()) for k in params)
        out.setdefault("face_sharding", {})[str(shape)] = str(
            getattr(_face_sharding(mesh), "spec", None)
        )
        out["meshes"][str(shape)] = {
            "losses": losses,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "param_diff": diff,
        }
        if shape == (2, 4):
            flat = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(run.frozen))
            tr = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state.trainable))
            conv = "unet.down_blocks.0.resnets.0.conv1.kernel"
            q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.kernel"
            lora = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.lora_k.lora_a"
            kv_s = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_s.kernel"
            adam_mu = state.opt_state[1][0].mu
            mu = dict((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(adam_mu))
            out["specs"] = {
                "conv_kernel": spec_str(flat[conv].get_value()),
                "attn_q_kernel": spec_str(flat[q].get_value()),
                "norm_scale": spec_str(flat["unet.conv_norm_out.scale"].get_value()),
                "token_embedding": spec_str(
                    flat["text_encoder.embeddings.token_embedding.embedding"].get_value()
                ),
                "lora_a": spec_str(tr[lora].get_value()),
                "image_branch": spec_str(tr[kv_s].get_value()),
                "adapter_kernel": spec_str(
                    tr["text_adapter.adapters.0.blocks.0.linear.kernel"].get_value()
                ),
                "adam_mu_lora_a": spec_str(mu[lora].get_value()),
                "step": spec_str(state.step),
                "batch": spec_str(batch["target"]),
            }
            # Save on this (2, 4) mesh, restore onto (8, 1): same values, new shardings.
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = Checkpointer(tmp, every=1, keep=1)
                ckpt.save(STEPS, state, run.data, cfg.to_dict(), force=True)
                ckpt.wait()
                mesh8 = sharding.make_mesh(8, 1)
                run8 = setup(cfg, mesh8)
                restored = ckpt.restore(STEPS, run8.host_state, run8.state_sh, run8.data)
                ckpt.close()
            r_tr = dict(
                (".".join(map(str, p)), v) for p, v in nnx.to_flat_state(restored.trainable)
            )
            out["restore"] = {
                "param_diff": max(
                    float(np.abs(np.asarray(r_tr[k].get_value()) - params[k]).max()) for k in params
                ),
                "step": int(restored.step),
                "data_index": run8.data.index,
                "adapter_spec": spec_str(
                    r_tr["text_adapter.adapters.0.blocks.0.linear.kernel"].get_value()
                ),
                "mesh_devices": len(r_tr[lora].get_value().sharding.device_set),
            }
    # The mesh built by hand, as before JAX's mesh utilities chose the order (reversed device
    # order here): the same losses.
    by_hand = Mesh(np.asarray(jax.devices()[::-1]).reshape(4, 2), sharding.MESH_AXES)
    _, _, _, losses, params, _ = run_mesh(cfg, (4, 2), mesh=by_hand)
    out["meshes"]["(4, 2) by hand"] = {
        "losses": losses,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_diff": max(float(np.abs(params[k] - ref_params[k]).max()) for k in params),
    }
    # Gradient accumulation on a sharded mesh: 2 microbatches of 8 (one example per device),
    # the same losses and parameters as the whole batch of 16 on one device.
    accum = tiny.get_config()
    accum.train.batch_size = 16
    accum.train.grad_accum = 2
    _, _, _, losses, params, _ = run_mesh(accum, (4, 2))
    out["meshes"]["(4, 2) grad_accum=2"] = {
        "losses": losses,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "param_diff": max(float(np.abs(params[k] - ref_params[k]).max()) for k in params),
    }
    # One example per device: the face loss's sub-batch (4 of 8, by t) is rounded up to 8 so
    # that it shards like the batch; unsharded, XLA had every device decode all 4.
    mesh8 = sharding.make_mesh(8, 1)
    out["face_gflop_per_device"] = {}
    for name, fraction in (("default", None), ("whole_batch", 1.0)):
        c = tiny.get_config()
        c.train.batch_size = 8
        if fraction is not None:
            c.model.face_batch_fraction = fraction
        run = setup(c, mesh8)
        state = sharding.put_global(run.host_state, run.state_sh)
        batch = sharding.put_batch(next(run.data), mesh8)
        compiled = run.step.lower(state, run.frozen, batch).compile()
        out["face_gflop_per_device"][name] = compiled_flops(compiled) / 1e9
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
