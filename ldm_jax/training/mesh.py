"""The one place that builds the device mesh and the shardings of parameters, optimizer state and batches.

Axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose members also shard the large parameters
and their optimizer state, ZeRO-3 style). The batch is split over data×fsdp. Large tensors are sharded along
`fsdp` on their largest divisible dimension; small ones are replicated (their all-gathers would cost more than
they save).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int]:
    """Resolves the configured (data, fsdp) sizes; one of them may be -1 (= fill the remaining devices)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of mesh.data / mesh.fsdp may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or num_devices % known:
            raise ValueError(f"mesh: mesh.data×mesh.fsdp={sizes} cannot fill {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: mesh.data×mesh.fsdp = {sizes[0]}×{sizes[1]} = {math.prod(sizes)} does not match the "
            f"{num_devices} available devices"
        )
    return sizes[0], sizes[1]


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """Mesh over all devices (or the given ones) with the configured data×fsdp shape."""
    # Auto axes: flax linen layers are not written for explicit-sharding types (ShardingTypeError otherwise).
    types = (AxisType.Auto,) * len(MESH_AXES)
    if devices is None:
        return jax.make_mesh(mesh_shape(mesh_cfg, jax.device_count()), MESH_AXES, axis_types=types)
    return Mesh(np.asarray(devices).reshape(mesh_shape(mesh_cfg, len(devices))), MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The partition rule: shard the largest dimension divisible by the fsdp size, if the tensor is large."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2**16) -> Any:
    """NamedSharding for every leaf of a (abstract) state pytree: params and optimizer moments alike."""
    fsdp = mesh.shape["fsdp"]

    def rule(leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(shape, fsdp, min_size))

    return jax.tree.map(rule, abstract_state)


def check_batch_size(global_batch: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ValueError(f"{field}={global_batch} is not divisible by the data-parallel size {n} (mesh.data×mesh.fsdp)")
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} is not divisible by the {jax.process_count()} processes")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded over data×fsdp."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}
