"""How many devices JAX's CPU platform exposes: one per core by default, set before JAX starts.

    cpu_devices.use_for_config(config)       # train.py: `config.cpu_devices` (0 = one per core)
    cpu_devices.use(cpu_devices.count(0, [batch], cpu_devices.cores()))   # the benchmark

`count` is the policy (a requested count, or one per core that divides every batch);
`count_for_config` applies it to a training config's batches and mesh; `use` sets JAX's
`jax_num_cpu_devices` unless the environment or an earlier JAX start already decided. Only the
command lines call this: a library caller keeps the devices its process has.
"""

from __future__ import annotations

import math
import os

import jax


def count(requested: int, batch_sizes: list[int], cores: int) -> int:
    """How many devices XLA's CPU platform should expose: `requested` if positive; for 0 (auto)
    one per core, lowered to the largest count that divides every batch in `batch_sizes`.

    With one device XLA's intra-op threads leave cores idle in a step of many small ops; a device
    per core runs the data-parallel halves side by side (README Performance: digits through the
    trainer 478 → 646 img/s, ViT-Ti/16 inference 41 → 56 img/s, on 2 cores).
    """
    if not isinstance(requested, int) or requested < 0:
        raise ValueError(f"cpu_devices={requested!r}: 0 (one per core) or a device count")
    if requested:
        return requested
    return max(d for d in range(1, max(cores, 1) + 1) if all(b % d == 0 for b in batch_sizes))


def count_for_config(config, cores: int) -> int:
    """`count` for a training config: its micro-batch and eval batch over the mesh.

    Auto (0) on a mesh with a -1 axis: one device per core, a multiple of the other axes' sizes
    (`mesh.fsdp=2` on 2 cores: 2 devices); a mesh of fixed sizes names its own count."""
    requested = config.get("cpu_devices", 0)
    sizes = [int(v) for v in dict(config.mesh).values()]
    fixed = math.prod(v for v in sizes if v > 0)
    micro_batch = config.batch_size // max(config.accum_steps, 1)
    batches = [micro_batch] + ([config.eval_batch_size] if config.get("eval_batch_size") else [])
    if requested:
        try:
            return count(requested, batches, cores)
        except ValueError as e:
            raise ValueError(f"config.{e}") from None
    if -1 not in sizes or any(b % fixed for b in batches):
        return fixed  # (a batch the fixed axes do not divide is named by the batch check)
    # One per core, in whole multiples of the fixed axes: the auto rule on the batches per group.
    return fixed * count(0, [b // fixed for b in batches], max(cores // fixed, 1))


def cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS / Windows


def use(count: int, *, auto: bool = True, multi_process: bool = False) -> int | None:
    """Sets JAX's CPU device count to `count` before JAX starts; None where it is left alone: the
    environment already sets one (XLA_FLAGS, JAX_NUM_CPU_DEVICES), `auto` in a multi-process run
    (one device per process, as JAX starts it), or JAX has started already (a caller in a process
    that used JAX before keeps its devices)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if os.environ.get("JAX_NUM_CPU_DEVICES") or (multi_process and auto):
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # "should be updated before backends are initialized"
        return None
    return count


def use_for_config(config, *, multi_process: bool = False) -> int | None:
    """`use` with the count `config.cpu_devices` asks for on this machine's cores."""
    return use(
        count_for_config(config, cores()),
        auto=not config.get("cpu_devices", 0),
        multi_process=multi_process,
    )
