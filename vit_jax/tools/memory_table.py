"""`python -m vit_jax.tools.memory_table`: the README's per-device memory table of params + AdamW state.

    python -m vit_jax.tools.memory_table --variants ViT-L/16,ViT-H/14,ViT-g/14 --fsdp 1,4,8

Each cell is XLA's compiled memory analysis of the train state placed as `config.sharding_rules`'
default (FSDP over `--fsdp` simulated CPU devices); nothing is allocated.
"""

from __future__ import annotations

import argparse
import os


def compiled_state_bytes(variant: str, fsdp: int, devices: int, image_size: int = 224) -> int:
    """Per-device bytes of params + AdamW state for `variant`, from XLA's memory analysis."""
    import jax

    from configs import common
    from vit_jax import sharding
    from vit_jax.model import vit
    from vit_jax.train import optim
    from vit_jax.train import state as train_state

    config = common.get_config()
    model = vit.create_model(variant, image_size=image_size, num_classes=1000)
    tx, _ = optim.make_optimizer(config.optim, config.schedule, vit.param_shapes(model), 1000)
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

    from vit_jax.model import vit

    if jax.device_count() < devices:
        raise SystemExit(f"FATAL need {devices} simulated CPU devices; JAX already started")
    print("| model | params | " + " | ".join(f"fsdp {f}" for f in fsdps) + " |")
    print("|---|---|" + "---|" * len(fsdps))
    for variant in args.variants.split(","):
        model = vit.create_model(variant, image_size=224, num_classes=1000)
        count = vit.count_params(vit.param_shapes(model))
        cells = [compiled_state_bytes(variant, f, f) / 2**30 for f in fsdps]
        print(
            f"| {variant} | {count / 1e6:.0f}M | "
            + " | ".join(f"{c:.2f} GiB" for c in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
