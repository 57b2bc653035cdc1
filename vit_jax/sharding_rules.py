"""Which array of the train state is cut over which mesh axis: rules from the config, and a report.

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
device. `python -m vit_jax.sharding_rules` prints the README's memory table from XLA's compiled
memory analysis on simulated CPU devices (nothing is allocated).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import PartitionSpec

SPECIAL = ("fsdp", "replicate")


def _param_path(key_path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def parse_rules(rules: Sequence | None) -> list[tuple[re.Pattern, Any]]:
    """Validates `config.sharding_rules` → [(compiled regex, spec)]; ValueError names the bad one."""
    from vit_jax.sharding import MESH_AXES

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
    from vit_jax.sharding import fsdp_spec

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
    import jax

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
    import jax

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


# ---------------------------------------------------------------------------------------------
# `python -m vit_jax.sharding_rules`: the README's per-device memory table, from compiled analysis.


def compiled_state_bytes(variant: str, fsdp: int, devices: int, image_size: int = 224) -> int:
    """Per-device bytes of params + AdamW state for `variant`, from XLA's memory analysis."""
    import jax

    from configs import common
    from vit_jax import models, optim, sharding, train_state
    from vit_jax.model_config import get_config

    config = common.get_config()
    model = models.VisionTransformer(get_config(variant, image_size=image_size, num_classes=1000))
    tx, _ = optim.make_optimizer(config.optim, config.schedule, models.param_shapes(model), 1000)
    shapes = train_state.state_shapes(model, tx)
    mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp}, jax.devices()[:devices])
    shardings = sharding.tree_shardings(shapes, mesh, config.fsdp_min_size)
    args = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    # The state passed through one jitted step: its arguments are the state as placed.
    compiled = jax.jit(lambda state: state, out_shardings=shardings).lower(args).compile()
    return int(compiled.memory_analysis().argument_size_in_bytes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="ViT-L/16,ViT-H/14,ViT-g/14")
    parser.add_argument("--fsdp", default="1,4,8")
    args = parser.parse_args(argv)
    fsdps = [int(f) for f in args.fsdp.split(",")]
    devices = max(fsdps)
    os.environ["JAX_PLATFORMS"] = "cpu"
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    if jax.device_count() < devices:
        raise SystemExit(f"FATAL need {devices} simulated CPU devices; JAX already started")
    print("| model | params | " + " | ".join(f"fsdp {f}" for f in fsdps) + " |")
    print("|---|---|" + "---|" * len(fsdps))
    from vit_jax import models
    from vit_jax.model_config import get_config

    for variant in args.variants.split(","):
        model = models.VisionTransformer(get_config(variant, image_size=224, num_classes=1000))
        count = models.count_params(models.param_shapes(model))
        cells = [compiled_state_bytes(variant, f, f) / 2**30 for f in fsdps]
        print(
            f"| {variant} | {count / 1e6:.0f}M | "
            + " | ".join(f"{c:.2f} GiB" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
