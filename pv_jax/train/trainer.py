"""The training loop behind ``train_tpu.py``: one SPMD program on every host.

Order of work: check the config against the mesh and the inputs (before anything is built or
compiled), build the model on the host, place the frozen networks and the train state sharded
by the rules of ``sharding.py``, restore the latest checkpoint if any, compile the train step
once (explicit in/out shardings, donated state), then drive it from Python.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from pv_jax.paths import require_local, run_path
from pv_jax.photoverse import (
    PhotoVerseBundle,
    PhotoVerseConfig,
    build_photoverse,
    count_params,
    random_photoverse,
    split_trainable,
)
from pv_jax.photoverse.losses import face_subset_size
from pv_jax.train import sharding
from pv_jax.train.checkpoint import Checkpointer
from pv_jax.train.data import RecordBatches, SyntheticBatches
from pv_jax.train.metrics import MetricWriter, compiled_flops, peak_tflops
from pv_jax.train.step import TrainState, learning_rate_schedule, make_optimizer, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "folders": pretrained weights; "tiny" / "random_sd15": random networks of that size.
BASE_KINDS = ("folders", "tiny", "random_sd15")


class ConfigError(ValueError):
    """A configuration that cannot run; says what to change."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


def check_config(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fail before building or compiling anything when the config cannot run here."""
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    b = cfg.train.batch_size
    if b % data_parallel:
        raise ConfigError(
            f"train.batch_size={b} is not divisible by the mesh's data x fsdp = "
            f"{data_parallel}; use a multiple of {data_parallel}"
        )
    if b % jax.process_count():
        raise ConfigError(
            f"train.batch_size={b} is not divisible by the {jax.process_count()} processes"
        )
    if cfg.base.kind not in BASE_KINDS:
        raise ConfigError(f"base.kind={cfg.base.kind!r} is not one of {list(BASE_KINDS)}")
    if cfg.base.kind == "folders":
        for field, what in (
            ("sd_folder", "a diffusers Stable Diffusion 1.5 folder"),
            ("clip_vision_folder", "a transformers CLIP ViT-L/14 vision folder"),
        ):
            path = cfg.base[field]
            _local_only(path, f"base.{field}")
            if not path or not Path(path).is_dir():
                raise ConfigError(
                    f"base.{field}={path!r} is not a folder: pass --config.base.{field}=DIR with "
                    f"{what} (or --config.base.kind=tiny for tiny random networks)"
                )
    if cfg.base.dtype not in DTYPES:
        raise ConfigError(f"base.dtype={cfg.base.dtype!r} is not one of {list(DTYPES)}")
    if cfg.data.source not in ("records", "synthetic"):
        raise ConfigError(f"data.source={cfg.data.source!r} is not 'records' or 'synthetic'")
    if cfg.data.source == "records" and not cfg.data.data_dir:
        raise ConfigError(
            "data.data_dir is empty: pass --config.data.data_dir=DIR (a dataset built with "
            "`python -m pv_jax.data.preprocess`) or --config.data.source=synthetic"
        )
    if cfg.data.source == "records":
        _local_only(cfg.data.data_dir, "data.data_dir")  # grain's ArrayRecord reader
    PhotoVerseConfig.from_dict(cfg.model.to_dict())  # raises on a bad method setting


def _local_only(path: str, field: str) -> None:
    """ConfigError for a bucket path where the reader needs local files."""
    try:
        require_local(path, field)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def build_bundle(
    cfg: ml_collections.ConfigDict, *, face_net: bool | None = None
) -> PhotoVerseBundle:
    """The PhotoVerse model of the config, on the host (sharded placement follows).
    ``face_net``: build the frozen face net (default: when the face loss is on; sampling
    needs none)."""
    pv_cfg = PhotoVerseConfig.from_dict(cfg.model.to_dict())
    with_face_net = bool(pv_cfg.face_weight) if face_net is None else face_net
    dtype = DTYPES[cfg.base.dtype]
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        if cfg.base.kind != "folders":  # random networks of a preset
            return random_photoverse(
                pv_cfg,
                cfg.base.kind.removeprefix("random_"),
                seed=cfg.base.seed,
                with_face_net=with_face_net,
                dtype=dtype,
                attention=cfg.base.attention,
                remat=cfg.base.remat,
            )
        return build_photoverse(
            pv_cfg,
            sd_folder=cfg.base.sd_folder,
            clip_vision_folder=cfg.base.clip_vision_folder,
            face_net_path=cfg.base.face_net_path or None,
            with_face_net=with_face_net,
            dtype=dtype,
            attention=cfg.base.attention,
            remat=cfg.base.remat,
            variant=cfg.base.variant or None,
            seed=cfg.base.seed,
        )


def make_data(cfg: ml_collections.ConfigDict, bundle: PhotoVerseBundle):
    """This process's batch iterator (synthetic or the face dataset)."""
    local = cfg.train.batch_size // jax.process_count()
    common = dict(
        local_batch=local,
        resolution=cfg.data.resolution,
        num_words=len(bundle.config.text_layers),
        seed=cfg.data.seed,
    )
    if cfg.data.source == "synthetic":
        return SyntheticBatches(
            bundle.tokenizer, cfg.data.prompts, process_index=jax.process_index(), **common
        )
    return RecordBatches(
        cfg.data.data_dir,
        bundle.tokenizer,
        cfg.data.prompts,
        worker_count=cfg.data.worker_count,
        split=cfg.data.split,
        **common,
    )


def train_state_shardings(state: TrainState, tx, trainable_sh, mesh) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their parameters."""
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, trainable_sh, transform_non_params=lambda _: rep
    )
    return TrainState(
        step=rep,
        trainable=trainable_sh,
        opt_state=opt_sh,
        ema=trainable_sh if state.ema is not None else None,
        nan_streak=rep,
        nan_total=rep,
    )


class SampleGrid:
    """A row of (reference, sample) pairs with the current weights, for watching training:
    the first references of the first batch, the first training prompt, a fixed seed."""

    def __init__(self, run: Run, batch: dict, cfg: ml_collections.ConfigDict, count: int = 4):
        from pv_jax.sampling import Sampler, SamplerSpec

        bundle = run.bundle
        self.graphdef, self.frozen = run.graphdef, run.frozen
        # Process 0's references on every process: the sampler's inputs must agree.
        self.refs = multihost_utils.broadcast_one_to_all(batch["reference"][:count])
        self.tokens = bundle.tokenizer([cfg.data.prompts[0]], bundle.config.words)
        self.empty = bundle.tokenizer.plain([""])
        self.sampler = Sampler(bundle.model, bundle.schedule)
        self.spec = SamplerSpec(steps=cfg.train.sample_steps)
        unet, vae = bundle.model.unet.config, bundle.model.vae.config
        latent = cfg.data.resolution // vae.downsample_factor
        self.noise = jax.random.normal(jax.random.key(0), (1, latent, latent, unet.in_channels))
        self.size = cfg.data.resolution

    def __call__(self, trainable) -> np.ndarray:
        """(size, 2 * count * size, 3) uint8: reference, sample, reference, sample, ..."""
        _, state = nnx.split(nnx.merge(self.graphdef, trainable, self.frozen))
        tiles = []
        for ref in self.refs:
            image = self.sampler(
                np.asarray(ref)[None],
                self.tokens.input_ids,
                self.tokens.slots,
                self.empty,
                self.noise,
                jax.random.key(1),
                num_words=self.tokens.num_words,
                spec=self.spec,
                state=state,
            )
            ref = np.asarray(ref, np.uint8)
            ref_tile = np.asarray(Image.fromarray(ref).resize((self.size, self.size)))
            tiles += [ref_tile, (np.asarray(image[0]) * 255).round().astype(np.uint8)]
        return np.concatenate(tiles, axis=1)


class _Preemption:
    """SIGTERM (TPU preemption, job stop) sets a flag that the loop checks between steps.

    One process reads its own flag every step (free). Several processes must stop at the same
    step, so they agree (an all-gather of the flags) only every ``every`` steps: the loop does
    not wait for the devices on the other steps.
    """

    def __init__(self, every: int = 10):
        self.requested = False
        self.every = max(int(every), 1)
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, step: int) -> bool:
        """True when any process was asked to stop (all processes stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.asarray(flags).any())

    def restore(self) -> None:
        """Put back the SIGTERM handler that was there before."""
        signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class RunSummary:
    """What a run did (also printed as its last line)."""

    start_step: int
    end_step: int
    stopped_by: str  # "steps", "sigterm"
    compile_s: float
    train_s: float
    flops_per_step: float
    trainable_params: int
    frozen_params: int
    skipped_steps: int
    last_metrics: dict[str, float]


def make_optimizer_from_config(cfg: ml_collections.ConfigDict, *, with_schedule: bool = False):
    """The optimizer of ``cfg.optim`` (and its learning-rate schedule, if asked)."""
    o = cfg.optim
    lr = learning_rate_schedule(
        o.lr,
        warmup_steps=o.warmup_steps,
        total_steps=cfg.train.steps,
        kind=o.schedule,
        end_factor=o.end_factor,
    )
    tx = make_optimizer(
        lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm
    )
    return (tx, lr) if with_schedule else tx


@dataclasses.dataclass
class Run:
    """A built run: model, data, optimizer, shardings, the host train state and the jitted
    step (not yet compiled)."""

    bundle: PhotoVerseBundle
    data: Any
    graphdef: Any
    tx: optax.GradientTransformation
    host_state: TrainState  # step 0, on the host
    state_sh: TrainState  # shardings of the train state
    frozen: Any  # the frozen networks, placed with frozen_sh
    frozen_sh: Any
    step: Any  # jax.jit of the train step with explicit shardings and donated state
    trainable_params: int
    frozen_params: int


def _face_sharding(cfg, bundle, mesh: jax.sharding.Mesh) -> jax.sharding.Sharding | None:
    """The batch sharding for the face loss's sub-batch when it splits evenly over devices."""
    subset = face_subset_size(
        cfg.train.batch_size, bundle.config, bundle.schedule.num_train_timesteps
    )
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    return sharding.batch_sharding(mesh) if subset % shards == 0 else None


def setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Run:
    """Check the config, build the model and data, place the frozen networks, jit the step."""
    check_config(cfg, mesh)
    bundle = build_bundle(cfg)
    data = make_data(cfg, bundle)  # a missing or empty dataset fails here, before compiling
    graphdef, trainable, frozen = split_trainable(bundle.model)
    tx, lr = make_optimizer_from_config(cfg, with_schedule=True)
    trainable_sh = sharding.state_shardings(trainable, mesh)
    frozen_sh = sharding.state_shardings(frozen, mesh)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        host_state = TrainState.create(trainable, tx, ema=cfg.train.ema_decay > 0)
    state_sh = train_state_shardings(host_state, tx, trainable_sh, mesh)
    step_fn = make_train_step(
        graphdef,
        tx,
        lr,
        noise_schedule=bundle.schedule,
        config=bundle.config,
        seed=cfg.train.seed,
        fusion=cfg.train.fusion,
        ema_decay=cfg.train.ema_decay,
        face_sharding=_face_sharding(cfg, bundle, mesh),
    )
    jitted = jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return Run(
        bundle=bundle,
        data=data,
        graphdef=graphdef,
        tx=tx,
        host_state=host_state,
        state_sh=state_sh,
        frozen=sharding.put_global(frozen, frozen_sh),
        frozen_sh=frozen_sh,
        step=jitted,
        trainable_params=count_params(trainable),
        frozen_params=count_params(frozen),
    )


def _mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of ``cfg.mesh``; a shape that does not fit the devices is a ConfigError."""
    try:
        return sharding.make_mesh(
            cfg.mesh.data, cfg.mesh.fsdp, dcn_data=cfg.mesh.get("dcn_data", 1)
        )
    except ValueError as e:
        raise ConfigError(f"mesh {dict(cfg.mesh)} on {jax.device_count()} devices: {e}") from e


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunSummary:
    """Train (or resume) the run of ``cfg`` in ``workdir`` (local or ``gs://``); returns its
    summary.

    The loop dispatches steps without waiting for the devices: metrics come to the host only on
    logging steps, checkpoint steps and sample-grid steps (where the host waits anyway), and
    the timings are averages over the steps since the previous such sync.
    """
    workdir = run_path(workdir)
    mesh = _mesh(cfg)
    run = setup(cfg, mesh)
    data, frozen = run.data, run.frozen
    n_trainable, n_frozen = run.trainable_params, run.frozen_params
    t = cfg.train

    ckpt = Checkpointer(
        workdir, every=t.checkpoint_every, keep=t.keep_checkpoints, use_async=t.async_checkpoints
    )
    start = ckpt.latest_step()
    if start is None:
        state, start = sharding.put_global(run.host_state, run.state_sh), 0
    else:
        state = ckpt.restore(start, run.host_state, run.state_sh, data)
    run.host_state = None  # the placed state is the only copy from here on
    nan_total_start = int(jax.device_get(state.nan_total))
    local_batch = next(data)
    batch = sharding.put_batch(local_batch, mesh)
    t0 = time.perf_counter()
    compiled = run.step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = compiled_flops(compiled)
    peak = peak_tflops(jax.devices()[0], t.peak_tflops) * 1e12

    writer = MetricWriter(
        workdir, tensorboard=t.tensorboard, flush_every_s=t.get("metrics_flush_s", 30.0)
    )
    grid = SampleGrid(run, local_batch, cfg) if t.sample_every else None
    preemption = _Preemption(every=t.get("preemption_check_every", 10))
    config_dict = cfg.to_dict()
    stopped_by, metrics_host = "steps", {}
    bar = tqdm(
        total=t.steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not t.progress or jax.process_index() != 0,
    )
    t_train = t_sync = time.perf_counter()
    step = saved = synced = start
    try:
        while step < t.steps:
            if step > start:
                batch = sharding.put_batch(next(data), mesh)
            state, metrics = compiled(state, frozen, batch)  # dispatched, not waited for
            step += 1
            bar.update()
            log_due = step % t.log_every == 0 or step == t.steps
            save_due = ckpt.manager.should_save(step)
            grid_due = grid is not None and step % t.sample_every == 0
            if log_due or save_due or grid_due:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_sync) / (step - synced)
                t_sync, synced = now, step
                metrics_host.update(
                    step_time_s=dt,
                    examples_per_s=t.batch_size / dt,
                    mfu=flops / dt / peak if peak else 0.0,
                )
                if log_due:
                    writer.write(step, metrics_host)
                bar.set_postfix(loss=f"{metrics_host['loss']:.4f}", refresh=False)
                if metrics_host["nan_streak"] >= t.max_nan_streak:
                    raise TrainingDiverged(
                        f"{int(metrics_host['nan_streak'])} consecutive steps had a non-finite "
                        f"loss or gradient (up to step {step}); stopped without saving, so the "
                        f"last good checkpoint (step {ckpt.latest_step()}) is kept. Lower "
                        "optim.lr or check the data."
                    )
                if grid_due:
                    writer.write_image(step, "samples", grid(state.trainable))
            if save_due:
                writer.flush()  # the metrics up to a checkpoint are durable before it is
                if ckpt.save(step, state, data, config_dict):
                    saved = step
            if preemption.agreed(step):
                stopped_by = "sigterm"
                break
        if saved != step:  # the final (or preempted) step is always saved
            writer.flush()
            ckpt.save(step, state, data, config_dict, force=True)
        ckpt.wait()
        skipped = int(jax.device_get(state.nan_total)) - nan_total_start
    finally:
        bar.close()
        writer.close()
        preemption.restore()
        ckpt.close()
    train_s = time.perf_counter() - t_train
    summary = RunSummary(
        start_step=start,
        end_step=step,
        stopped_by=stopped_by,
        compile_s=compile_s,
        train_s=train_s,
        flops_per_step=flops,
        trainable_params=n_trainable,
        frozen_params=n_frozen,
        skipped_steps=skipped,
        last_metrics=metrics_host,
    )
    if jax.process_index() == 0:
        steps_run = max(step - start, 1)
        print(
            f"train: steps {start}->{step} ({stopped_by}) | compile {compile_s:.1f}s, "
            f"{train_s / steps_run:.3f}s/step, {t.batch_size * steps_run / train_s:.2f} "
            f"examples/s | loss {metrics_host.get('loss', float('nan')):.4f} | skipped "
            f"{skipped} | trainable {n_trainable:,} of {n_trainable + n_frozen:,} params | "
            f"{workdir}"
        )
    return summary


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """A JSON-able summary."""
    return dataclasses.asdict(summary)
