"""train_tpu.py: meshes and processes agree, checkpoints resume exactly, SIGTERM saves, NaN
steps are skipped, bad configs fail before compiling."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from etils import epath
from flax import nnx
from PIL import Image

from pv_jax.run_checkpoint import Checkpointer
from pv_jax.train import sharding, trainer
from pv_jax.train.metrics import MetricWriter, read_metrics, step_flops

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", str(ROOT / "configs" / "tiny.py")]
# The kill/resume and multi-process tests check the checkpoint and process plumbing; the face
# loss (compile-heavy on a CPU) is covered under sharding by tests/multi_device.py.
NO_FACE = ["--config.model.face_weight=0"]
ASTRONAUT = os.path.join(os.path.dirname(skimage.data.__file__), "astronaut.png")


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _train_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_tpu.py"), *TINY, "--workdir", str(workdir), *args]


def _by_step(workdir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in read_metrics(workdir):
        out[row["step"]] = row
    return out


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited early"
        try:
            if any(r["step"] >= step for r in read_metrics(workdir)):
                return
        except FileNotFoundError:  # no metrics.jsonl yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_multi_device_meshes_agree_and_restore_onto_another_mesh():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multi_device.py")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    # AdamW scales each update by its gradient's size (g / (|g| + eps)), so fp32 reduction-order
    # differences in a near-zero gradient move its parameter by a fraction of the learning rate
    # (1e-3): 1.01e-5 measured on (8, 1) with the one-layer tiny preset, 1e-5 held for two layers.
    for mesh in ("(8, 1)", "(4, 2)", "(2, 4)", "(4, 2) by hand", "(4, 2) grad_accum=2"):
        r = result["meshes"][mesh]
        assert r["loss_diff"] < 1e-5 and r["param_diff"] < 2e-5, (mesh, r)
    # The face loss's sub-batch (8 of 16) is constrained to the batch sharding on every mesh.
    assert set(result["face_sharding"].values()) == {"P(('data', 'fsdp'),)"}
    # With one example per device the sub-batch (4 of 8) is rounded up to 8 and sharded: each
    # device decodes one sample, as with the whole batch (unsharded, each decoded all 4).
    flops = result["face_gflop_per_device"]
    assert abs(flops["default"] / flops["whole_batch"] - 1.0) < 0.01, flops
    # Parameter classes on the (data=2, fsdp=4) mesh: input widths over fsdp, the rest whole.
    assert result["specs"] == {
        "conv_kernel": "(None, None, 'fsdp', None)",
        "attn_q_kernel": "('fsdp', None)",
        "norm_scale": "(None,)",
        "token_embedding": "('fsdp', None)",
        "lora_a": "('fsdp', None)",
        "image_branch": "('fsdp', None)",
        "adapter_kernel": "('fsdp', None)",
        "adam_mu_lora_a": "('fsdp', None)",
        "step": "()",
        "batch": "(('data', 'fsdp'),)",
    }
    restore = result["restore"]
    assert restore["param_diff"] == 0.0 and restore["step"] == 2
    assert restore["data_index"] == 2  # the data iterator resumed too
    assert restore["adapter_spec"] == "(None, None)"  # fsdp = 1 on the (8, 1) mesh
    assert restore["mesh_devices"] == 8


@pytest.mark.slow
def test_kill_and_sigterm_resume_exactly_from_a_bucket(tmp_path, gcs_bucket):
    """The uninterrupted run on local disk, the interrupted one in gs://bucket/run (a real GCS
    API on localhost): SIGTERM saves, kill -9 loses nothing past the last checkpoint, every
    replayed step equals the uninterrupted one, and sample.py samples from the bucket. Both runs
    accumulate two microbatches (grad_accum=2): a resumed accumulating run is exact too."""
    steps = [
        "--config.train.steps=9",
        "--config.train.checkpoint_every=3",
        "--config.train.grad_accum=2",
    ]
    ref = tmp_path / "uninterrupted"
    subprocess.run(_train_cmd(ref, *NO_FACE, *steps), check=True, env=_env(), timeout=600)
    want = _by_step(ref)
    assert sorted(want) == list(range(1, 10))

    run = "gs://bucket/run"
    env = _env(**gcs_bucket)
    # Metrics uploaded on every log step here, so that the test can watch the run's progress.
    cmd = _train_cmd(run, *NO_FACE, *steps, "--config.train.metrics_flush_s=0")
    # 1) SIGTERM after step 2: saves the step it reached and exits cleanly.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert summary["stopped_by"] == "sigterm"
    ckpts = epath.Path(run) / "checkpoints"
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved[-1] == summary["end_step"] >= 2
    # 2) Resume, then kill -9 mid-run: no chance to save.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(proc, run, summary["end_step"] + 4)
    proc.kill()
    proc.wait()
    # 3) Resume from the last finished checkpoint in the bucket and finish.
    subprocess.run(cmd, check=True, env=env, timeout=600)

    assert not Path("gs:").exists() and not (ROOT / "gs:").exists()  # nothing went to local disk
    got = read_metrics(run)
    assert {r["step"] for r in got} == set(range(1, 10))
    for row in got:  # every logged step, replays included, equals the uninterrupted run
        for key in ("loss", "diffusion", "text_reg", "image_reg", "grad_norm", "learning_rate"):
            assert row[key] == want[row["step"]][key], (row["step"], key)
    assert (epath.Path(run) / "tensorboard").is_dir()

    import sample

    out = sample.main(
        ["--ckpt", run, "--ref", ASTRONAUT, "--prompt", "a photo of S*", "--steps", "2"]
        + ["--out", str(tmp_path / "samples")]
    )
    assert out["weights"] == f"trained checkpoint {run}"
    assert len(out["images"]) == 1 and (tmp_path / "samples" / "contact_sheet.png").exists()


def test_metrics_in_a_bucket_are_uploaded_whole_when_flushed(gcs_bucket):
    """A bucket object cannot be appended to: lines wait for a flush (rate limit, checkpoint or
    close), and a resumed writer keeps the lines already there."""
    run = "gs://bucket/metrics-run"
    writer = MetricWriter(run, tensorboard=False, flush_every_s=1e9)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    with pytest.raises(FileNotFoundError):
        read_metrics(run)  # not uploaded yet
    writer.flush()
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    writer.close()
    writer = MetricWriter(run, tensorboard=False, flush_every_s=0.0)
    writer.write(3, {"loss": 0.25})  # flush_every_s=0: uploaded at once
    assert [r["loss"] for r in read_metrics(run)] == [1.0, 0.5, 0.25]
    writer.write(2, {"loss": 0.4})  # a resumed run repeats step 2: by_step keeps the last
    assert [r["loss"] for r in read_metrics(run)] == [1.0, 0.5, 0.25, 0.4]
    assert [(r["step"], r["loss"]) for r in read_metrics(run, by_step=True)] == [
        (1, 1.0),
        (2, 0.4),
        (3, 0.25),
    ]
    writer.close()


# A training process's checkpoint save, as far as the checkpoint listing goes.
_SAVE = """
import sys, numpy as np
from pv_jax.run_checkpoint import Checkpointer
class Position:  # the smallest iterator grain's handler saves
    def get_state(self): return b"{}"
    def set_state(self, state): pass
c = Checkpointer(sys.argv[1], every=1, keep=5, use_async=False)
c.save(int(sys.argv[2]), {"w": np.ones(2, np.float32)}, Position(), {"a": 1})
c.close()
"""


def test_a_process_sees_checkpoints_written_by_another_after_its_first_look(gcs_bucket):
    """gcsfs caches listings per process: a sampler polling a live run in a bucket must still
    see the run's new checkpoints (pv_jax.paths.refresh, called by Checkpointer)."""
    run = "gs://bucket/polled-run"
    env = _env(**gcs_bucket)
    subprocess.run([sys.executable, "-c", _SAVE, run, "1"], check=True, env=env)
    assert Checkpointer(run, every=1, keep=5).latest_step() == 1  # listed (and cached) here
    subprocess.run([sys.executable, "-c", _SAVE, run, "2"], check=True, env=env)
    assert Checkpointer(run, every=1, keep=5).latest_step() == 2


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    common = [
        *NO_FACE,
        "--config.train.steps=3",
        "--config.train.batch_size=8",
        "--config.train.sample_every=3",
        "--config.train.sample_steps=2",
    ]
    single = tmp_path / "single"
    subprocess.run(
        _train_cmd(single, *common, "--cpu_devices=8"), check=True, env=_env(), timeout=600
    )
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            _train_cmd(
                multi,
                *common,
                "--cpu_devices=4",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--config.mesh.dcn_data=2",  # each process one granule (a "slice") of data
            ),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
    a, b = _by_step(single), _by_step(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) < 1e-5
    # The sample grid (4 references and their samples, 32 px) is the same in both runs.
    grids = [np.asarray(Image.open(w / "samples" / "step_0000003.png")) for w in (single, multi)]
    assert grids[0].shape == (32, 8 * 32, 3)
    assert np.abs(grids[0].astype(int) - grids[1].astype(int)).max() <= 2


def _tiny_cfg(**train):
    from configs import tiny

    cfg = tiny.get_config()
    cfg.model.face_weight = 0.0
    cfg.train.update(train)
    return cfg


def _nan_cfg():
    # Two microbatches of one (grad_accum=2), one example NaN: one microbatch's gradient is not
    # finite, and the whole step is skipped.
    cfg = _tiny_cfg(ema_decay=0.75, max_nan_streak=3, checkpoint_every=2, grad_accum=2)
    cfg.optim.warmup_steps = 0  # the first applied update must move the weights
    return cfg


def _float_target(batch: dict) -> dict:
    """The batch with its uint8 target as float32 in [0, 1] (the step reads either), so that a
    batch with a NaN has the good batch's types and the step compiles once for both."""
    return dict(batch, target=np.asarray(batch["target"], np.float32) / 255.0)


def _nan_batch(good: dict) -> dict:
    target = np.array(_float_target(good)["target"])
    target[0] = np.nan
    return dict(good, target=target)


def test_nan_batch_is_skipped_then_training_goes_on():
    """A step with a non-finite loss changes no weight, moment or EMA and is counted; the next
    good step applies its update and the EMA blends it."""
    cfg = _nan_cfg()
    mesh = sharding.make_mesh(1, 1)
    run = trainer.setup(cfg, mesh)
    state = sharding.put_global(run.host_state, run.state_sh)
    good = _float_target(next(run.data))
    bad = _nan_batch(good)
    before = jax.tree.map(np.asarray, state.trainable)
    state, m = run.step(state, run.frozen, sharding.put_batch(bad, mesh))
    assert int(m["skipped"]) == 1 and int(m["nan_streak"]) == 1 and int(state.nan_total) == 1
    after = jax.tree.map(np.asarray, state.trainable)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)  # the update was not applied
    state, m = run.step(state, run.frozen, sharding.put_batch(good, mesh))
    assert int(m["skipped"]) == 0 and int(m["nan_streak"]) == 0 and int(state.step) == 2
    changed = jax.tree.map(np.asarray, state.trainable)
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(changed), strict=True)
    )
    # EMA: untouched by the skipped step, then 0.75 * old + 0.25 * new.
    for old, new, ema in zip(
        jax.tree.leaves(after),
        jax.tree.leaves(changed),
        jax.tree.leaves(jax.tree.map(np.asarray, state.ema)),
        strict=True,
    ):
        np.testing.assert_allclose(ema, 0.75 * old + 0.25 * new, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # trainer.train to the stop and a checkpoint restore, 45 s; make test-all (CI)
def test_repeated_nans_stop_the_run_with_only_good_states_saved(tmp_path, monkeypatch):
    cfg = _nan_cfg()
    mesh = sharding.make_mesh(1, 1)
    run = trainer.setup(cfg, mesh)
    before = jax.tree.map(np.asarray, run.host_state.trainable)
    bad = _nan_batch(next(run.data))

    class NaNs(type(run.data)):
        def __next__(self):
            return dict(super().__next__(), target=bad["target"])

    monkeypatch.setattr(
        trainer,
        "make_data",
        lambda cfg, bundle: NaNs(
            bundle.tokenizer,
            cfg.data.prompts,
            local_batch=2,
            resolution=cfg.data.resolution,
            num_words=len(bundle.config.text_layers),
        ),
    )
    with pytest.raises(trainer.TrainingDiverged, match="3 consecutive steps"):
        trainer.train(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [1, 1, 1]
    # Checkpoints hold only good states: step 2 was a NaN step, but the state it saved is the
    # unchanged initial one (skipped updates: same weights, optimizer moments still zero), and
    # nothing was saved after the stop.
    assert not (tmp_path / "checkpoints" / "3").exists()
    fresh = trainer.setup(cfg, mesh).host_state
    ckpt = Checkpointer(tmp_path, every=1, keep=10)
    assert ckpt.latest_step() == 2
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), fresh)
    saved = ckpt.restore(2, fresh, shardings)
    ckpt.close()
    assert int(saved.step) == 2 and int(saved.nan_streak) == 2 and int(saved.nan_total) == 2
    for name in ("trainable", "opt_state"):
        for x, y in zip(
            jax.tree.leaves(getattr(fresh, name)),
            jax.tree.leaves(getattr(saved, name)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    for x, y in zip(jax.tree.leaves(fresh.trainable), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # the initial weights of the first run


def test_config_errors_before_compiling(tmp_path):
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2})
    with pytest.raises(trainer.ConfigError, match="batch_size=6 is not divisible.*= 8"):
        trainer.check_config(_tiny_cfg(batch_size=6), mesh)
    # 64 = 4 microbatches of 16 on 8 devices is fine; 16 microbatches of 4 are not.
    trainer.check_config(_tiny_cfg(batch_size=64, grad_accum=4), mesh)
    with pytest.raises(trainer.ConfigError, match="grad_accum=16 .* multiple of .* = 8 exam"):
        trainer.check_config(_tiny_cfg(batch_size=64, grad_accum=16), mesh)
    cfg = _tiny_cfg()
    cfg.base.kind = "folders"
    with pytest.raises(trainer.ConfigError, match="base.sd_folder='' is not a folder"):
        trainer.check_config(cfg, sharding.make_mesh(1, 1))
    cfg = _tiny_cfg()
    cfg.data.source = "records"
    with pytest.raises(trainer.ConfigError, match="data.data_dir is empty"):
        trainer.check_config(cfg, sharding.make_mesh(1, 1))
    cfg.data.data_dir = str(tmp_path / "nothing-here")
    from pv_jax.train.data import DataError

    with pytest.raises(DataError, match="holds no built PhotoVerse face dataset"):
        trainer.setup(cfg, sharding.make_mesh(1, 1))
    cfg.data.data_dir = "gs://bucket/faces"
    with pytest.raises(
        trainer.ConfigError,
        match="data.data_dir='gs://bucket/faces' is in a bucket.*copy it to local disk.*gcsfuse",
    ):
        trainer.check_config(cfg, sharding.make_mesh(1, 1))
    for field, value, match in (
        ("reference_augment", 1.5, r"data.reference_augment=1.5 is outside \[0, 1\]"),
        ("descriptor_noise", -0.1, "data.descriptor_noise=-0.1 is negative"),
        ("reference_augment", 0.5, "apply to photos: set --config.data.source=records"),
    ):
        cfg = _tiny_cfg()  # synthetic data
        cfg.data[field] = value
        with pytest.raises(trainer.ConfigError, match=match):
            trainer.check_config(cfg, sharding.make_mesh(1, 1))
    with pytest.raises(ValueError, match="mesh data=3 x fsdp=1 = 3 devices, but 1 are present"):
        sharding.make_mesh(3, 1)
    with pytest.raises(ValueError, match="mesh.dcn_data=2 does not divide mesh data=1"):
        sharding.make_mesh(1, 1, dcn_data=2)


@pytest.mark.slow  # a sampler compile; the SDXL train -> sample test (slow) also covers it
def test_sample_grid_feeds_identity_tokens_their_descriptors(tiny_pv):
    """A run whose image branch reads identity tokens draws its sample grid with each
    reference's descriptor: the batch's, else (synthetic batches) the face net's of the targets,
    as the loss computes them; the grid refuses to start without them."""
    import dataclasses

    from pv_jax.photoverse import TINY_CONFIG, split_trainable, tiny_photoverse
    from pv_jax.photoverse.losses import face_descriptors
    from pv_jax.sampling import SampleGrid
    from pv_jax.train.data import SyntheticBatches

    cfg = dataclasses.replace(TINY_CONFIG, image_source="both", identity_tokens=2)
    bundle = tiny_photoverse(cfg, with_face_net=False)  # the grid samples without one
    batch = next(
        SyntheticBatches(
            bundle.tokenizer, ["a photo of S*"], local_batch=3, resolution=32, num_words=2
        )
    )
    # The training model's face net (the shared tiny model's: building one takes 9 s).
    model = types.SimpleNamespace(config=cfg, face_net=tiny_pv.model.face_net)
    got = trainer._grid_descriptors(model, batch, count=2)
    want = face_descriptors(model, batch["target"][:2] / 255.0, batch["landmarks"][:2])
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
    chex.assert_shape(got, (2, 128))
    stored = np.arange(3 * 128, dtype=np.float32).reshape(3, 128)
    np.testing.assert_array_equal(
        trainer._grid_descriptors(model, {**batch, "descriptor": stored}, 2), stored[:2]
    )
    assert trainer._grid_descriptors(tiny_pv.model, batch) is None  # encoder tokens only
    graphdef, trainable, frozen = split_trainable(bundle.model)
    grid_args = (bundle, graphdef, frozen, batch["reference"], "a photo of S*")
    with pytest.raises(ValueError, match="needs the references' dlib descriptors"):
        SampleGrid(*grid_args, steps=2, resolution=32, count=2)
    grid = SampleGrid(*grid_args, steps=2, resolution=32, count=2, descriptors=got)
    assert grid(trainable).shape == (32, 4 * 32, 3)


def test_config_arguments_combine_and_unknown_names_fail():
    """The text after a config file's colon: bare names are True, values take their default's
    type, the parts combine, and a misspelt name fails listing the known ones."""
    from configs import photoverse_sd15, photoverse_sdxl
    from configs.common import parse_arg

    a = parse_arg("tiny,fsdp=2,image_source=both", tiny=False, fsdp=None, image_source="x")
    assert (a.tiny, a.fsdp, a.image_source) == (True, 2, "both")
    assert parse_arg(None, fsdp=1).fsdp == 1 and parse_arg("fsdp=4", fsdp=1).fsdp == 4
    c = photoverse_sd15.get_config("fsdp=2,image_source=identity,identity_tokens=8")
    assert (c.mesh.fsdp, c.model.image_source, c.model.identity_tokens) == (2, "identity", 8)
    assert photoverse_sd15.get_config().model.image_source == "encoder"  # the paper's
    assert photoverse_sd15.get_config("grad_accum=4").train.grad_accum == 4
    assert photoverse_sdxl.get_config("fsdp=4,grad_accum=16").train.grad_accum == 16
    xl = photoverse_sdxl.get_config("tiny,image_source=both")
    assert (xl.mesh.fsdp, xl.base.kind, xl.model.image_source) == (1, "tiny_sdxl", "both")
    assert (
        photoverse_sdxl.get_config().mesh.fsdp == 4
        and photoverse_sdxl.get_config("fsdp=8").mesh.fsdp == 8
    )
    with pytest.raises(ValueError, match="unknown name 'tinyy'; known: fsdp, grad_accum, tiny"):
        photoverse_sdxl.get_config("tinyy")
    with pytest.raises(ValueError, match="give fsdp a value"):
        photoverse_sdxl.get_config("fsdp")
    with pytest.raises(ValueError, match="tiny is true or false"):
        photoverse_sdxl.get_config("tiny=flase")


def _whole_vs_accumulated(ks: tuple[int, ...], batch_size: int = 8) -> dict:
    """(((loss, metrics), grads), flops) of one tiny batch (face loss on) by the unaccumulated
    step's value_and_grad (k = 1) and by ``accumulate_grads`` with k microbatches."""
    from configs import tiny
    from pv_jax.photoverse import build_bundle, photoverse_loss, split_trainable
    from pv_jax.train.step import accumulate_grads

    cfg = tiny.get_config()
    cfg.train.batch_size = batch_size
    bundle = build_bundle(cfg)
    assert bundle.config.face_weight > 0
    graphdef, trainable, frozen = split_trainable(bundle.model)
    batch = next(trainer.make_data(cfg, bundle))
    key = jax.random.fold_in(jax.random.key(0), 3)
    common = dict(noise_schedule=bundle.schedule, config=bundle.config, fusion=True)

    def whole(params):
        model = nnx.merge(graphdef, params, frozen)
        return photoverse_loss(model, batch, key, schedule=bundle.schedule, fusion=True)

    out = {}
    for k in ks:
        if k == 1:
            fn = jax.jit(jax.value_and_grad(whole, has_aux=True))
        else:
            fn = jax.jit(
                lambda p, k=k: accumulate_grads(graphdef, p, frozen, batch, key, k, **common)
            )
        compiled = fn.lower(trainable).compile()
        out[k] = jax.device_get(compiled(trainable)), step_flops(compiled, k)
    return out


def test_microbatch_plan_spreads_the_face_selection_evenly():
    """The split that makes accumulation exact: every example once, microbatch j holding the
    t-ranks j, j + K, ..., and the whole batch's face selection (the subset smallest t, stable
    on ties, of those t <= 500) spread so that no microbatch holds more than ceil(subset / K)."""
    from pv_jax.train.step import microbatch_plan

    t = np.random.default_rng(0).integers(0, 1000, 16)
    t[3] = t[5]  # a tie
    order, mask = map(np.asarray, microbatch_plan(jnp.asarray(t), 4, 6, 500))
    assert sorted(order) == list(range(16))
    by_t = np.argsort(t, kind="stable")
    np.testing.assert_array_equal(order.reshape(4, 4), by_t.reshape(4, 4).T)
    want = np.zeros(16, bool)
    want[by_t[:6]] = True
    np.testing.assert_array_equal(mask, want & (t <= 500))
    per_micro = [int(np.isin(row, by_t[:6]).sum()) for row in order.reshape(4, 4)]
    assert per_micro == [2, 2, 1, 1]


@pytest.mark.slow  # two compiles of the tiny step with the face loss, 130 s; make test-all (CI)
def test_grad_accumulation_gives_the_whole_batch_update():
    """4 microbatches of 2 (scan) give the 8-example batch's loss, every metric and every
    gradient: the same per-example draws, and the face loss's sub-batch (4 samples of t <= 500)
    spread one per microbatch, divided by the whole batch's count."""
    out = _whole_vs_accumulated((1, 4))
    ((loss1, m1), g1), flops1 = out[1]
    ((loss4, m4), g4), flops4 = out[4]
    # XLA counts the scan's body once; step_flops (the trainer's MFU) counts it K times.
    assert abs(flops4 / flops1 - 1.0) < 0.01, (flops1, flops4)
    assert float(m1["face"]) > 0 and 0 < float(m1["face_fraction"]) < 1  # the face loss ran
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for name in ("loss", "diffusion", "face", "text_reg", "image_reg", "face_fraction"):
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, atol=1e-7, err_msg=name)
    chex.assert_trees_all_equal_structs(g1, g4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
