"""The device mesh and every sharding decision, in one place.

Parameters carry logical axis names (``pv_jax.models.layers``: embed, mlp, heads, conv_in,
conv_out, vocab, norm). :data:`LOGICAL_RULES` maps them onto mesh axes, first match wins; a
dimension that the mesh axis does not divide, or whose mesh axis is already used by another
dimension of the same tensor, stays replicated. Batches are split over ``data`` and ``fsdp``
together (FSDP is data parallelism whose parameters are also sharded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pv_jax.models import layers

if TYPE_CHECKING:
    from pv_jax.train.step import TrainState

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis. Weights are sharded along their input width over fsdp; output
# widths stay whole so that each matmul needs one all-gather of its weight, not of activations.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    (layers.EMBED, "fsdp"),
    (layers.CONV_IN, "fsdp"),
    (layers.VOCAB, "fsdp"),
    (layers.MLP, None),
    (layers.HEADS, None),
    (layers.CONV_OUT, None),
    (layers.NORM, None),
)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    dcn_data: int = 1,
) -> Mesh:
    """A (data, fsdp) mesh over ``devices`` (default: all); ``data=-1`` takes what is left.

    The device order comes from JAX's mesh utilities, so that on a TPU slice each axis follows
    the ICI topology. ``dcn_data`` > 1 splits the data axis over that many slices (multi-slice:
    data parallel across the slow data-centre network, fsdp inside each slice); on platforms
    without slices (CPU, GPU) each process counts as one.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices; choose a divisor")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are present; "
            "set mesh.data = -1 to use them all"
        )
    if dcn_data < 1 or data % dcn_data:
        raise ValueError(
            f"mesh.dcn_data={dcn_data} does not divide mesh data={data}: use the number of "
            "slices (a divisor of the data axis)"
        )
    if dcn_data == 1:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            (data // dcn_data, fsdp),
            (dcn_data, 1),
            devices,
            process_is_granule=devices[0].platform != "tpu",
            allow_split_physical_axes=True,
        )
    return Mesh(grid, MESH_AXES)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """The PartitionSpec of a tensor with logical axis ``names`` (None: replicated)."""
    if not names:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in used or size % mesh.shape[axis] or mesh.shape[axis] == 1:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """The same State with each variable's value replaced by its NamedSharding (from its
    logical axis names), so that the tree matches ``state`` leaf for leaf."""

    def one(var: nnx.Variable) -> nnx.Variable:
        names = var.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, var.get_value().shape, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_state_shardings(
    state: TrainState, tx: optax.GradientTransformation, trainable_sh: nnx.State, mesh: Mesh
) -> TrainState:
    """Shardings of the whole train state: optimizer moments follow their parameters."""
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, state.opt_state, trainable_sh, transform_non_params=lambda _: rep
    )
    return state.replace(
        step=rep,
        trainable=trainable_sh,
        opt_state=opt_sh,
        ema=trainable_sh if state.ema is not None else None,
        nan_streak=rep,
        nan_total=rep,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value."""
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree, shardings):
    """Place host values (the same on every process) as global arrays with ``shardings``.

    Each device receives only its shard (``make_array_from_callback``), so a full copy never
    lands on one device, and it works across processes.
    """

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
