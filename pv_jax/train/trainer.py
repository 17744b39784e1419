"""The training loop behind ``train_tpu.py``: one SPMD program on every host.

Order of work: check the config against the mesh and the inputs (before anything is built or
compiled), build the model on the host, place the frozen networks and the train state sharded
by the rules of ``sharding.py``, restore the latest checkpoint if any, compile the train step
once (explicit in/out shardings, donated state), then drive it from Python.
"""

from __future__ import annotations

import dataclasses
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
from tqdm import tqdm

from pv_jax.paths import require_local, run_path
from pv_jax.photoverse import PhotoVerseBundle, PhotoVerseConfig, count_params, split_trainable
from pv_jax.photoverse.factory import BASE_KINDS, DTYPES, build_bundle
from pv_jax.run_checkpoint import Checkpointer
from pv_jax.sampling import SampleGrid
from pv_jax.train import sharding
from pv_jax.train.data import RecordBatches, SyntheticBatches
from pv_jax.train.metrics import MetricWriter, peak_tflops, step_flops
from pv_jax.train.step import TrainState, learning_rate_schedule, make_optimizer, make_train_step


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
    k = cfg.train.grad_accum
    if k < 1 or b % k or (b // k) % data_parallel:
        raise ConfigError(
            f"train.grad_accum={k} with train.batch_size={b}: each of the {k} microbatches "
            f"must hold a multiple of the mesh's data x fsdp = {data_parallel} examples; use a "
            f"grad_accum that divides {b // data_parallel if b % data_parallel == 0 else b}"
        )
    if b % jax.process_count():
        raise ConfigError(
            f"train.batch_size={b} is not divisible by the {jax.process_count()} processes"
        )
    if cfg.base.kind not in BASE_KINDS:
        raise ConfigError(f"base.kind={cfg.base.kind!r} is not one of {list(BASE_KINDS)}")
    if cfg.base.kind == "folders":
        for field, what in (
            ("sd_folder", "a diffusers Stable Diffusion 1.5 or SDXL folder"),
            ("clip_vision_folder", "a transformers CLIP vision folder (ViT-L/14, ViT-H/14...)"),
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
            "`python -m pv_jax.data`) or --config.data.source=synthetic"
        )
    if cfg.data.source == "records":
        _local_only(cfg.data.data_dir, "data.data_dir")  # grain's ArrayRecord reader
    if not 0.0 <= cfg.data.reference_augment <= 1.0:
        raise ConfigError(
            f"data.reference_augment={cfg.data.reference_augment} is outside [0, 1]: 0 turns it "
            "off, 1 is the full range (pv_jax.train.data.augment_reference)"
        )
    if cfg.data.descriptor_noise < 0:
        raise ConfigError(
            f"data.descriptor_noise={cfg.data.descriptor_noise} is negative: pass a standard "
            "deviation >= 0 (0 turns it off; 0.025 moves a descriptor about 0.28)"
        )
    augmenting = cfg.data.reference_augment > 0 or cfg.data.descriptor_noise > 0
    if augmenting and cfg.data.source != "records":
        raise ConfigError(
            "data.reference_augment / data.descriptor_noise apply to photos: set "
            "--config.data.source=records, or set both to 0 for synthetic data"
        )
    PhotoVerseConfig.from_dict(cfg.model.to_dict())  # raises on a bad method setting


def _local_only(path: str, field: str) -> None:
    """ConfigError for a bucket path where the reader needs local files."""
    try:
        require_local(path, field)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def make_data(cfg: ml_collections.ConfigDict, bundle: PhotoVerseBundle):
    """This process's batch iterator (synthetic or the face dataset)."""
    local = cfg.train.batch_size // jax.process_count()
    common = dict(
        local_batch=local,
        resolution=cfg.data.resolution,
        num_words=len(bundle.config.text_layers),
        seed=cfg.data.seed,
        # SDXL: each photo's original size and crop (from preprocessing) as the UNet's time ids.
        micro_conditioning=bundle.model.is_xl,
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
        reference_augment=cfg.data.reference_augment,
        descriptor_noise=cfg.data.descriptor_noise,
        **common,
    )


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
        lr,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        clip_norm=o.clip_norm,
        lr_multipliers=dict(o.lr_multipliers),
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


def _face_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.Sharding:
    """The face loss's sub-batch sharding: the batch's (the loss rounds the sub-batch up to a
    multiple of its shards, ``face_subset_size``, so that every device decodes its share)."""
    return sharding.batch_sharding(mesh)


def jit_train_step(
    cfg: ml_collections.ConfigDict,
    bundle: PhotoVerseBundle,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    lr: optax.Schedule,
    state_sh,
    frozen_sh,
    mesh: jax.sharding.Mesh,
):
    """The run's train step, jitted with its shardings: (state, frozen, batch) -> (state,
    metrics), the state donated (also used by bench/train_step.py on abstract shapes)."""
    step_fn = make_train_step(
        graphdef,
        tx,
        lr,
        noise_schedule=bundle.schedule,
        config=bundle.config,
        seed=cfg.train.seed,
        fusion=cfg.train.fusion,
        ema_decay=cfg.train.ema_decay,
        face_sharding=_face_sharding(mesh),
        grad_accum=cfg.train.grad_accum,
    )
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def setup(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, abstract=False) -> Run:
    """Check the config, build the model and data, place the frozen networks, jit the step.

    ``abstract``: shapes only, nothing allocated (random-network bases): ``host_state`` and
    ``frozen`` are abstract, for lowering and compiling ``step`` alone (MaxText's
    train_compile; ``bench/train_step.py``'s compile-only rows) with :func:`abstract_batch`.
    """
    check_config(cfg, mesh)
    bundle = build_bundle(cfg, abstract=abstract)
    data = make_data(cfg, bundle)  # a missing or empty dataset fails here, before compiling
    graphdef, trainable, frozen = split_trainable(bundle.model)
    tx, lr = make_optimizer_from_config(cfg, with_schedule=True)
    trainable_sh = sharding.state_shardings(trainable, mesh)
    frozen_sh = sharding.state_shardings(frozen, mesh)
    ema = cfg.train.ema_decay > 0
    if abstract:
        host_state = jax.eval_shape(lambda t: TrainState.create(t, tx, ema=ema), trainable)
    else:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            host_state = TrainState.create(trainable, tx, ema=ema)
    state_sh = sharding.train_state_shardings(host_state, tx, trainable_sh, mesh)
    jitted = jit_train_step(cfg, bundle, graphdef, tx, lr, state_sh, frozen_sh, mesh)
    return Run(
        bundle=bundle,
        data=data,
        graphdef=graphdef,
        tx=tx,
        host_state=host_state,
        state_sh=state_sh,
        frozen=frozen if abstract else sharding.put_global(frozen, frozen_sh),
        frozen_sh=frozen_sh,
        step=jitted,
        trainable_params=count_params(trainable),
        frozen_params=count_params(frozen),
    )


def abstract_batch(run: Run) -> dict[str, jax.ShapeDtypeStruct]:
    """The keys, shapes and dtypes of the run's global batch (its own data's first one)."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in next(run.data).items()}


def _mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The mesh of ``cfg.mesh``; a shape that does not fit the devices is a ConfigError."""
    try:
        return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, dcn_data=cfg.mesh.dcn_data)
    except ValueError as e:
        raise ConfigError(f"mesh {dict(cfg.mesh)} on {jax.device_count()} devices: {e}") from e


def _grid_descriptors(model, batch: dict[str, np.ndarray], count: int = 4) -> np.ndarray | None:
    """The sample grid's identity-token input: the batch's dlib descriptors, else (synthetic
    batches carry none) the face net's of its targets, as the loss computes them."""
    if not model.config.uses_identity:
        return None
    if "descriptor" in batch:
        return batch["descriptor"][:count]
    from pv_jax.photoverse.losses import face_descriptors, to_unit

    target = to_unit(jnp.asarray(batch["target"][:count]))
    return np.asarray(face_descriptors(model, target, jnp.asarray(batch["landmarks"][:count])))


class _Loop:
    """What the Python loop does around the compiled step: log, sample and save when due.

    Steps are dispatched without waiting for the devices: metrics come to the host only on
    logging, checkpoint and sample-grid steps (where the host waits anyway), and the timings
    are averages over the steps since the previous such sync.
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        run: Run,
        ckpt: Checkpointer,
        flops: float,
        start: int,
        first_batch: dict[str, np.ndarray],
    ):
        t = self.t = cfg.train
        self.ckpt, self.data, self.config_dict = ckpt, run.data, cfg.to_dict()
        self.flops = flops
        self.peak = peak_tflops(jax.devices()[0], t.peak_tflops) * 1e12
        self.writer = MetricWriter(
            workdir, tensorboard=t.tensorboard, flush_every_s=t.metrics_flush_s
        )
        self.grid = (
            SampleGrid(
                run.bundle,
                run.graphdef,
                run.frozen,
                first_batch["reference"],
                cfg.data.prompts[0],
                steps=t.sample_steps,
                resolution=cfg.data.resolution,
                descriptors=_grid_descriptors(run.bundle.model, first_batch),
            )
            if t.sample_every
            else None
        )
        self.bar = tqdm(
            total=t.steps,
            initial=start,
            desc="train",
            unit="step",
            disable=not t.progress or jax.process_index() != 0,
        )
        self.metrics: dict[str, float] = {}  # the last metrics brought to the host
        self.synced = self.saved = start
        self.t_sync = time.perf_counter()

    def due(self, step: int) -> tuple[bool, bool, bool]:
        """Count ``step`` on the progress bar; whether logging, saving, sampling are due."""
        t = self.t
        self.bar.update()
        log_due = step % t.log_every == 0 or step == t.steps
        save_due = self.ckpt.manager.should_save(step)
        sample_due = self.grid is not None and step % t.sample_every == 0
        return log_due, save_due, sample_due

    def log(self, step: int, metrics: dict[str, jax.Array], *, write: bool) -> None:
        """Bring the step's metrics to the host (the host waits for the devices here), with the
        timings since the last sync; ``write`` them; stop a diverged run."""
        self._sync(step, metrics)
        if write:
            self.writer.write(step, self.metrics)
        self._check_finite(step)

    def sample(self, step: int, state: TrainState) -> None:
        """Write the sample grid of the current weights."""
        self.writer.write_image(step, "samples", self.grid(state.trainable))

    def _sync(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """The step's metrics on the host, with the timings since the last sync."""
        self.metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - self.t_sync) / (step - self.synced)
        self.t_sync, self.synced = now, step
        self.metrics.update(
            step_time_s=dt,
            examples_per_s=self.t.batch_size / dt,
            mfu=self.flops / dt / self.peak if self.peak else 0.0,
        )
        self.bar.set_postfix(loss=f"{self.metrics['loss']:.4f}", refresh=False)

    def _check_finite(self, step: int) -> None:
        """TrainingDiverged after ``max_nan_streak`` non-finite steps in a row (before saving)."""
        streak = self.metrics["nan_streak"]
        if streak >= self.t.max_nan_streak:
            raise TrainingDiverged(
                f"{int(streak)} consecutive steps had a non-finite loss or gradient (up to step "
                f"{step}); stopped without saving, so the last good checkpoint (step "
                f"{self.ckpt.latest_step()}) is kept. Lower optim.lr or check the data."
            )

    def save(self, step: int, state: TrainState, *, force: bool = False) -> None:
        """Checkpoint ``step`` (when due or ``force``), the metrics up to it flushed first."""
        self.writer.flush()
        if self.ckpt.save(step, state, self.data, self.config_dict, force=force):
            self.saved = step

    def close(self) -> None:
        """Close the progress bar and the metric writer."""
        self.bar.close()
        self.writer.close()


def _initial_state(run: Run, ckpt: Checkpointer) -> tuple[TrainState, int]:
    """The placed train state and its step: the latest checkpoint's, else step 0."""
    start = ckpt.latest_step()
    if start is None:
        state, start = sharding.put_global(run.host_state, run.state_sh), 0
    else:
        state = ckpt.restore(start, run.host_state, run.state_sh, run.data)
    run.host_state = None  # the placed state is the only copy from here on
    return state, start


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunSummary:
    """Train (or resume) the run of ``cfg`` in ``workdir`` (local or ``gs://``); returns its
    summary."""
    workdir = run_path(workdir)
    mesh = _mesh(cfg)
    run = setup(cfg, mesh)
    t = cfg.train
    ckpt = Checkpointer(
        workdir, every=t.checkpoint_every, keep=t.keep_checkpoints, use_async=t.async_checkpoints
    )
    state, start = _initial_state(run, ckpt)
    nan_total_start = int(jax.device_get(state.nan_total))
    local_batch = next(run.data)
    batch = sharding.put_batch(local_batch, mesh)
    t0 = time.perf_counter()
    compiled = run.step.lower(state, run.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(compiled, t.grad_accum)

    loop = _Loop(cfg, workdir, run, ckpt, flops, start, local_batch)
    preemption = _Preemption(every=t.preemption_check_every)
    stopped_by, step, t_train = "steps", start, loop.t_sync
    try:
        while step < t.steps:
            if step > start:
                batch = sharding.put_batch(next(run.data), mesh)
            state, metrics = compiled(state, run.frozen, batch)  # dispatched, not waited for
            step += 1
            log_due, save_due, sample_due = loop.due(step)
            if log_due or save_due or sample_due:
                loop.log(step, metrics, write=log_due)
            if sample_due:
                loop.sample(step, state)
            if save_due:
                loop.save(step, state)
            if preemption.agreed(step):
                stopped_by = "sigterm"
                break
        if loop.saved != step:  # the final (or preempted) step is always saved
            loop.save(step, state, force=True)
        ckpt.wait()
        skipped = int(jax.device_get(state.nan_total)) - nan_total_start
    finally:
        loop.close()
        preemption.restore()
        ckpt.close()
    summary = RunSummary(
        start_step=start,
        end_step=step,
        stopped_by=stopped_by,
        compile_s=compile_s,
        train_s=time.perf_counter() - t_train,
        flops_per_step=flops,
        trainable_params=run.trainable_params,
        frozen_params=run.frozen_params,
        skipped_steps=skipped,
        last_metrics=loop.metrics,
    )
    if jax.process_index() == 0:
        print(_summary_line(summary, t.batch_size, workdir))
    return summary


def _summary_line(s: RunSummary, batch_size: int, workdir: str | os.PathLike) -> str:
    """The run's last printed line."""
    steps_run = max(s.end_step - s.start_step, 1)
    total = s.trainable_params + s.frozen_params
    return (
        f"train: steps {s.start_step}->{s.end_step} ({s.stopped_by}) | compile "
        f"{s.compile_s:.1f}s, {s.train_s / steps_run:.3f}s/step, "
        f"{batch_size * steps_run / s.train_s:.2f} examples/s | loss "
        f"{s.last_metrics.get('loss', float('nan')):.4f} | skipped {s.skipped_steps} | "
        f"trainable {s.trainable_params:,} of {total:,} params | {workdir}"
    )


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """A JSON-able summary."""
    return dataclasses.asdict(summary)
