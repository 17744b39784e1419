"""Orbax checkpoints of a training run: train state, data-iterator position and config.

One ``CheckpointManager`` under ``<workdir>/checkpoints`` (a local folder or a bucket path,
``gs://BUCKET/run``) with three named items: ``state``
(the :class:`~pv_jax.train.step.TrainState`: trainable weights, optimizer state, EMA, step and
NaN counters), ``data`` (each process's data-iterator position, through grain's handler) and
``config`` (JSON). Saves are asynchronous; a run restores the latest finished step onto
whatever mesh it runs on now (the target shardings are given at restore time).

Training writes and resumes these checkpoints; sampling reads only the trained weights and the
config (:meth:`Checkpointer.restore_weights`), so this module depends on neither.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grain
import jax
import orbax.checkpoint as ocp

from pv_jax.errors import CheckpointMismatchError, MissingPathError
from pv_jax.paths import is_remote, refresh, run_path

if TYPE_CHECKING:
    from pv_jax.photoverse import PhotoVerseBundle


@contextlib.contextmanager
def _quiet_read_only_notice():
    """Drop Orbax's log line that a manager we opened read-only is read-only (sampling opens one
    per load; the user asked for nothing to be written and needs no warning about it)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")

    log = logging.getLogger("absl")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``, resume from the latest."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, use_async=True):
        self.directory = run_path(workdir) / "checkpoints"
        refresh(self.directory)  # the manager lists the steps now: see them as they are
        self.manager = ocp.CheckpointManager(
            self.directory,
            # Named handlers let a fresh manager read item metadata (shapes) before a restore.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=every,
                max_to_keep=keep,
                enable_async_checkpointing=use_async,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter, config: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously) if ``step`` is due or ``force``; True if started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, state_like, shardings, data_iter=None) -> Any:
        """The state saved at ``step``, placed with ``shardings``; ``data_iter`` (if given) is
        rewound to where it was."""
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings
        )
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_weights(self, step: int, like, shardings, *, ema: bool = True) -> tuple[Any, str]:
        """Only the trained weights saved at ``step`` (the EMA ones when ``ema`` and the run kept
        them, else ``trainable``), shaped like ``like`` and placed with ``shardings``; the
        optimizer state is never read, so it need not match the optimizer config of today.
        Returns the weights and the name of the item read ("ema" or "trainable")."""
        with _quiet_read_only_notice():
            weights = ocp.CheckpointManager(
                self.directory,
                # Every saved item has a handler (only "state" is read): Orbax warns of the others.
                item_handlers={
                    "state": ocp.PyTreeCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler(),
                },
                options=ocp.CheckpointManagerOptions(
                    read_only=True, create=False, save_interval_steps=0
                ),
            )
        try:
            saved = weights.item_metadata(step)["state"]
            name = "ema" if ema and saved.get("ema") is not None else "trainable"
            _check_same_shapes(jax.tree.leaves(saved[name]), jax.tree.leaves(like))
            target = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings
            )
            restore = ocp.args.PyTreeRestore(
                item={name: target},
                restore_args={name: ocp.checkpoint_utils.construct_restore_args(target)},
                partial_restore=True,
            )
            out = weights.restore(step, args=ocp.args.Composite(state=restore))
        finally:
            weights.close()
        return out.state[name], name

    def check_shapes(self, step: int, state_like) -> None:
        """Raise ValueError when the saved state's tensor shapes differ from ``state_like``'s
        (before restoring: a mismatched restore fails deep inside Orbax's async readers)."""
        saved = jax.tree.leaves(self.manager.item_metadata(step)["state"])
        _check_same_shapes(saved, jax.tree.leaves(state_like))

    def saved_config(self, step: int) -> dict:
        """The config stored with ``step``."""
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out.config

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


class ShapeMismatchError(ValueError):
    """Saved tensors whose shapes differ from the model's (another base or config)."""


def _check_same_shapes(saved: list, wanted: list) -> None:
    """ShapeMismatchError naming the differing shapes when the two lists of tensors differ."""
    saved_shapes = sorted(tuple(m.shape) for m in saved)
    want_shapes = sorted(tuple(x.shape) for x in wanted)
    if saved_shapes != want_shapes:
        only_saved = sorted(set(saved_shapes) - set(want_shapes))[:5]
        only_model = sorted(set(want_shapes) - set(saved_shapes))[:5]
        raise ShapeMismatchError(
            f"{len(saved_shapes)} saved tensors vs {len(want_shapes)} in the model; shapes "
            f"only in the checkpoint {only_saved}, only in the model {only_model}"
        )


def _find_base_folder(folder: str, workdir: str | os.PathLike) -> str:
    """A relative base folder of a saved config: from the current directory if it is there,
    else from the nearest parent of the workdir that holds it (a model folder that carries its
    base, like ``models/toy_faces``, works from anywhere)."""
    path = Path(folder)
    if not folder or path.is_absolute() or path.exists() or is_remote(workdir):
        return folder
    for parent in Path(workdir).parents:
        if (parent / path).exists():
            return str(parent / path)
    return folder


def load_trained(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    sd_folder: str | None = None,
    clip_vision_folder: str | None = None,
    use_ema: bool = True,
    model_overrides: dict | None = None,
) -> PhotoVerseBundle:
    """The PhotoVerse of a training run (local or ``gs://``) with its trained weights (the EMA
    ones if kept and ``use_ema``). Only those weights are read (an Orbax partial restore): no
    optimizer is built and the optimizer state is never loaded."""
    # The model is built here only (a process that only saves checkpoints never imports it).
    import ml_collections
    from flax import nnx

    from pv_jax.photoverse import split_trainable
    from pv_jax.photoverse.factory import build_bundle

    workdir = run_path(workdir)
    refresh(workdir)  # a live run may have saved since this process last looked
    if not (workdir / "checkpoints").is_dir():
        raise MissingPathError(
            f"{workdir} has no checkpoints/: pass the --workdir of a train_tpu.py run"
        )
    ckpt = Checkpointer(workdir, every=1, keep=1_000_000)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise MissingPathError(
                f"{workdir}/checkpoints holds no finished checkpoint: wait for the run's first "
                "save (train.checkpoint_every) or pass another --ckpt"
            )
        cfg = ml_collections.ConfigDict(ckpt.saved_config(step))
        if sd_folder:
            cfg.base.sd_folder = sd_folder
        if clip_vision_folder:
            cfg.base.clip_vision_folder = clip_vision_folder
        for field in ("sd_folder", "clip_vision_folder"):
            cfg.base[field] = _find_base_folder(cfg.base[field], workdir)
        # The base as found (local folders absolute), for exports that name it.
        base = {
            k: v if not v or is_remote(v) else os.path.abspath(v)
            for k, v in ((k, cfg.base.get(k)) for k in ("sd_folder", "clip_vision_folder"))
        } | {"kind": cfg.base.get("kind")}
        if model_overrides:
            cfg.model.update(model_overrides)
        bundle = build_bundle(cfg, face_net=False)  # sampling needs no face net (not saved)
        graphdef, trainable, frozen = split_trainable(bundle.model)
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the sampler's device
        shardings = jax.tree.map(lambda _: one_device, trainable)
        weights, which = ckpt.restore_weights(step, trainable, shardings, ema=use_ema)
    except ShapeMismatchError as e:
        raise CheckpointMismatchError(
            f"checkpoint {workdir} step {step} does not fit the base model built from its "
            f"config (sd_folder={cfg.base.sd_folder!r}, kind={cfg.base.kind!r}): {e}. Load it "
            "onto the SD / CLIP folders it was trained with."
        ) from e
    finally:
        ckpt.close()
    bundle.model = nnx.merge(graphdef, weights, frozen)
    bundle.source = {
        "workdir": str(workdir),
        "step": step,
        "weights": which,
        "base": base,
        "data_split": cfg.data.get("split", "train"),  # the records the run trained on
    }
    return bundle
