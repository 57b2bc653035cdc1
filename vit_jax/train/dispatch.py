"""Several train steps per dispatch: which steps run together, and their batches on the devices.

A tiny model's step takes less time than the host needs to launch it, fetch its metrics and copy its
batch, so the trainer runs up to K steps per call (`train_step.make_multi_step`) on K host batches
stacked into one array. A group never crosses a step where the loop must look at the state (log,
eval, checkpoint, the end): it ends there, shorter, and the next one starts after it. Every group,
whatever its length, runs in the same compiled program (a loop over the first n of the K stacked
batches, n a runtime value), so the grouping changes how often the host launches, never a number
of the run (`make_multi_step` says why), and every event happens at exactly its step.
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
    """Steps per dispatch from `start` to `total`: `per_dispatch`, or fewer where a boundary (a
    multiple of a non-zero value of `every`, or `total`) comes first: each group ends at the next
    boundary or after `per_dispatch` steps, whichever is sooner."""
    if per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch={per_dispatch}: expected an int >= 1")
    periods = [p for p in every if p]
    sizes, step = [], start
    while step < total:
        end = min([step + per_dispatch, total] + [(step // p + 1) * p for p in periods])
        sizes.append(end - step)
        step = end
    return sizes


def grouped(
    batches: Iterator[Mapping[str, np.ndarray]], sizes: Iterable[int], stack: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(size, batches) per planned dispatch: `size` consecutive batches stacked on a new axis 0,
    padded with zeros to `stack` (the program's K; the padding is never read)."""
    for size in sizes:
        group = [next(batches) for _ in range(size)]
        if stack == 1:
            yield 1, {k: np.asarray(v)[None] for k, v in group[0].items()}
            continue
        out = {}
        for k in group[0]:
            first = np.asarray(group[0][k])
            out[k] = np.zeros((stack, *first.shape), first.dtype)
            for i, b in enumerate(group):
                out[k][i] = b[k]
        yield size, out


def to_devices(
    groups: Iterable[tuple[int, Mapping[str, np.ndarray]]], mesh: Mesh, prefetch: int = 2
) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """Global device arrays of each (stacked) group, `prefetch` groups copied ahead of the consumer."""
    stacked = sharding_lib.stacked_batch_sharding(mesh)

    def put(size, batch):
        arrays = {
            k: jax.make_array_from_process_local_data(stacked, np.asarray(v))
            for k, v in batch.items()
        }
        return size, arrays

    placed = itertools.starmap(put, groups)
    queue = collections.deque(itertools.islice(placed, max(prefetch, 1)))
    while queue:
        item = queue.popleft()
        queue.extend(itertools.islice(placed, 1))  # start the next copy before handing this out
        yield item
