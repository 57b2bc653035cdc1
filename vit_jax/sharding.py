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

Which array is cut over which axis: which array of the train state is cut over which mesh axis: rules from the config, and a report.

`config.sharding_rules` is a tuple of (regex, spec) pairs matched against parameter paths
('Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel'); the first match wins. A spec is
  'fsdp'        the default rule: cut the largest dimension divisible by mesh.fsdp, for arrays of at
                least `config.fsdp_min_size` elements (smaller ones stay whole);
  'replicate'   every device holds the whole array;
  (a, b, ...)   a PartitionSpec, one entry per dimension: None or a mesh axis ('data', 'fsdp'),
                e.g. ('.*/Dense_0/kernel$', (None, 'fsdp')).
Parameters no rule matches get 'fsdp'. Optimizer state that mirrors a parameter (Adam's moments)
gets that parameter's spec, so it lives on the same devices; the rest (step counters) is replicated.

`describe(...)` says what that did: how many parameters and bytes are sharded, and the bytes per
device (the trainer's start-up line).
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """(K, B, ...) stacked batches: K steps' batches, each split over the batch axes like one."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


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

    `rules` are `config.sharding_rules` (see `parse_rules`); with none, every array
    gets the FSDP default (`fsdp_spec`). Leaves only need `.shape` (ShapeDtypeStructs from
    `jax.eval_shape` are the usual input). Adam's moments take their parameters' specs, so they
    land on the same devices as their parameters.
    """
    specs = tree_specs(tree, dict(mesh.shape), fsdp_min_size, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


# --- Sharding rules: config.sharding_rules → a PartitionSpec per array ------------------------

SPECIAL = ("fsdp", "replicate")


def _param_path(key_path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def parse_rules(rules: Sequence | None) -> list[tuple[re.Pattern, Any]]:
    """Validates `config.sharding_rules` → [(compiled regex, spec)]; ValueError names the bad one."""
    parsed = []
    for i, rule in enumerate(rules or ()):
        if not (isinstance(rule, Sequence) and not isinstance(rule, str) and len(rule) == 2):
            raise ValueError(
                f"config.sharding_rules[{i}]={rule!r}: expected a (regex, spec) pair, e.g. "
                f"('.*/kernel$', (None, 'fsdp')) or ('pos_embedding', 'replicate')"
            )
        pattern, spec = rule
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"config.sharding_rules[{i}]: bad regex {pattern!r}: {e}") from None
        if isinstance(spec, str):
            if spec not in SPECIAL:
                raise ValueError(
                    f"config.sharding_rules[{i}] spec {spec!r}: allowed strings are {SPECIAL}, "
                    f"else a tuple of None / mesh axes {MESH_AXES} per dimension"
                )
        else:
            spec = tuple(spec)
            for entry in spec:
                names = entry if isinstance(entry, (tuple, list)) else (entry,)
                if any(n is not None and n not in MESH_AXES for n in names):
                    raise ValueError(
                        f"config.sharding_rules[{i}] spec {spec!r}: entries must be None or mesh "
                        f"axes {MESH_AXES}"
                    )
        parsed.append((compiled, spec))
    return parsed


def _resolve(spec, shape, path, mesh_shape, min_size) -> PartitionSpec:
    if spec == "fsdp":
        return fsdp_spec(shape, mesh_shape.get("fsdp", 1), min_size)
    if spec == "replicate":
        return PartitionSpec()
    if len(spec) > len(shape):
        raise ValueError(
            f"sharding rule spec {spec!r} has {len(spec)} entries but {path!r} has shape {shape}"
        )
    for dim, entry in zip(shape, spec):
        names = entry if isinstance(entry, (tuple, list)) else (entry,)
        ways = int(np.prod([mesh_shape[n] for n in names if n is not None]))
        if dim % ways:
            raise ValueError(
                f"sharding rule spec {spec!r} cuts a dimension of {dim} of {path!r} {shape} into "
                f"{ways} (mesh {dict(mesh_shape)}): it must divide evenly"
            )
    return PartitionSpec(*spec)


def tree_specs(tree: Any, mesh_shape: Mapping[str, int], min_size: int, rules=()) -> Any:
    """A PartitionSpec per array leaf of `tree` (params, or a whole {'params', 'opt_state', ...})."""
    rules = parse_rules(rules)
    has_params = isinstance(tree, Mapping) and "params" in tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_param_path(kp) for kp, _ in flat]
    if has_params:
        params = {p[len("params/") :] for p in paths if p.startswith("params/")}
    else:
        params = set(paths)

    def param_of(path: str) -> str | None:
        parts = path.split("/")
        return next(
            ("/".join(parts[k:]) for k in range(len(parts)) if "/".join(parts[k:]) in params), None
        )

    specs = []
    for path, (_, leaf) in zip(paths, flat):
        shape = tuple(leaf.shape)
        name = param_of(path)
        spec = "fsdp"
        if name is not None:
            spec = next((s for pattern, s in rules if pattern.search(name)), "fsdp")
        specs.append(_resolve(spec, shape, name or path, mesh_shape, min_size))
    return jax.tree_util.tree_unflatten(treedef, specs)


def _ways(spec: PartitionSpec, mesh_shape) -> int:
    ways = 1
    for entry in spec:
        for name in entry if isinstance(entry, (tuple, list)) else (entry,):
            if name is not None:
                ways *= mesh_shape[name]
    return ways


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def describe(shapes: Mapping, specs: Mapping, mesh_shape: Mapping[str, int]) -> tuple[str, bool]:
    """(one log line, whether any parameter is sharded) for a train state and its specs."""
    leaves = zip(jax.tree.leaves(shapes["params"]), jax.tree.leaves(specs["params"]))
    total = sharded = total_bytes = sharded_bytes = arrays = sharded_arrays = 0
    for leaf, spec in leaves:
        size, nbytes = int(np.prod(leaf.shape)), int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        arrays, total, total_bytes = arrays + 1, total + size, total_bytes + nbytes
        if _ways(spec, mesh_shape) > 1:
            sharded_arrays, sharded, sharded_bytes = (
                sharded_arrays + 1,
                sharded + size,
                sharded_bytes + nbytes,
            )
    state_bytes = sum(
        int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(shapes)
        if hasattr(leaf, "dtype")
    )
    per_device = sum(
        int(np.prod(leaf.shape)) * leaf.dtype.itemsize / _ways(spec, mesh_shape)
        for leaf, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs))
    )
    line = (
        f"Sharding: {sharded_arrays} of {arrays} parameter arrays cut over the mesh "
        f"({sharded:,} of {total:,} parameters, {_fmt_bytes(sharded_bytes)} of "
        f"{_fmt_bytes(total_bytes)}); params + optimizer state per device "
        f"{_fmt_bytes(per_device)} (of {_fmt_bytes(state_bytes)} in all)"
    )
    return line, sharded_arrays > 0


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
