"""Several train steps per dispatch: which steps run together, and their batches on the devices.

A tiny model's step takes less time than the host needs to launch it, fetch its metrics and copy its
batch, so the trainer runs K steps per call (`train_step.make_multi_step`, a `lax.scan`) on K host
batches stacked into one array. A group never crosses a step where the loop must look at the state
(log, eval, checkpoint, the end): those boundaries are reached with single steps, so only two
functions are ever compiled (one step, K steps) and every event happens at exactly its step.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding as sharding_lib


def plan(start: int, total: int, per_dispatch: int, every: Iterable[int]) -> list[int]:
    """Steps per dispatch from `start` to `total`: `per_dispatch` while no boundary (a multiple of a
    non-zero value of `every`, or `total`) falls strictly inside the group, else 1."""
    if per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch={per_dispatch}: expected an int >= 1")
    periods = [p for p in every if p]
    sizes, step = [], start
    while step < total:
        end = step + per_dispatch
        inside = end > total or any((end - 1) // p > step // p for p in periods)
        size = 1 if per_dispatch > 1 and inside else per_dispatch
        sizes.append(size)
        step += size
    return sizes


def grouped(
    batches: Iterator[Mapping[str, np.ndarray]], sizes: Iterable[int]
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(size, batch) per planned dispatch; groups of several batches are stacked on a new axis 0."""
    for size in sizes:
        if size == 1:
            yield 1, dict(next(batches))
            continue
        group = [next(batches) for _ in range(size)]
        yield size, {k: np.stack([b[k] for b in group]) for k in group[0]}


def to_devices(
    groups: Iterable[tuple[int, Mapping[str, np.ndarray]]], mesh: Mesh, prefetch: int = 2
) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """Global device arrays of each group, `prefetch` groups copied ahead of the consumer."""
    single = sharding_lib.batch_sharding(mesh)
    stacked = sharding_lib.stacked_batch_sharding(mesh)

    def put(size, batch):
        sharding = single if size == 1 else stacked
        arrays = {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
        }
        return size, arrays

    placed = itertools.starmap(put, groups)
    queue = collections.deque(itertools.islice(placed, max(prefetch, 1)))
    while queue:
        item = queue.popleft()
        queue.extend(itertools.islice(placed, 1))  # start the next copy before handing this out
        yield item
