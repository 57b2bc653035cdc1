"""Where arrays live: the device mesh, parameter placement (replicated or FSDP), global batches.

One mesh with two named axes serves every setup, from one CPU to a TPU pod:
  'data'  pure data parallelism: each device holds whole parameters, a slice of the batch;
  'fsdp'  fully-sharded data parallelism (ZeRO-3): the batch is split over it too, and every large
          parameter (with its optimizer state) is cut along one dimension over it; XLA inserts the
          all-gathers in the forward pass and the reduce-scatters of the gradients.
The batch is always split over both axes, so `mesh.data * mesh.fsdp` devices share one global batch.

Input: every process reads only its own slice of the global batch (numpy); `make_global_batch` joins
those slices into one `jax.Array` sharded over the batch axes, and `prefetch_to_device` keeps a few
batches on the devices ahead of the step so the host→device copy overlaps compute.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the leading (batch) dimension is split over both


def make_mesh(axis_sizes: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh; one size may be -1 (all remaining devices).

    `axis_sizes` is `config.mesh`, e.g. {'data': -1, 'fsdp': 1} (pure data parallelism) or
    {'data': 2, 'fsdp': 4}. Devices are ordered by `jax.devices()`, which keeps the 'fsdp' groups on
    neighbouring devices (the fast interconnect for its frequent all-gathers).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {unknown}; allowed: {list(MESH_AXES)}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one "
            f"-1 (= all remaining devices)"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not "
                f"divisible by {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
            f"there are {len(devices)}; use -1 for one axis to take all remaining devices"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (example) dimension split over the batch axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by `fsdp_size`; small or indivisible arrays replicate.

    The largest dimension gives the biggest saving per array and, in a ViT, is the hidden or MLP
    width, which always divides evenly by a power-of-two device count.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    by_size = sorted(range(len(shape)), key=lambda axis: shape[axis], reverse=True)
    for axis in by_size:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, fsdp_min_size: int, rules=()) -> Any:
    """NamedSharding for every array leaf of `tree` (params, optimizer state, a whole train state).

    `rules` are `config.sharding_rules` (see `vit_jax.sharding_rules`); with none, every array
    gets the FSDP default (`fsdp_spec`). Leaves only need `.shape` (ShapeDtypeStructs from
    `jax.eval_shape` are the usual input). Adam's moments take their parameters' specs, so they
    land on the same devices as their parameters.
    """
    from vit_jax import sharding_rules

    specs = sharding_rules.tree_specs(tree, dict(mesh.shape), fsdp_min_size, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
    """Fail before any compute when a global batch does not split evenly over devices/processes."""
    shards, processes = num_batch_shards(mesh), jax.process_count()
    if batch_size <= 0 or batch_size % shards or batch_size % processes:
        raise ValueError(
            f"{what}={batch_size} must be a positive multiple of the {shards} devices the batch is "
            f"split over (mesh {dict(mesh.shape)}) and of the {processes} processes"
        )


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch (numpy) → global `jax.Array`s sharded over the batch axes.

    Each process passes only the rows it read; the global batch is their concatenation in process
    order, which is how `make_array_from_process_local_data` lays the rows on the devices.
    """
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def prefetch_to_device(
    local_batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global device batches, keeping `size` of them in flight ahead of the consumer.

    Device transfers are asynchronous, so starting the copies of batches n+1..n+size before step n
    runs lets them overlap the step. `size=0` disables the look-ahead (one batch at a time).
    """
    batches = (make_global_batch(batch, mesh) for batch in local_batches)
    if size <= 0:
        yield from batches
        return
    queue = collections.deque(itertools.islice(batches, size))
    while queue:
        batch = queue.popleft()
        queue.extend(itertools.islice(batches, 1))  # start the next copy before handing this out
        yield batch
