"""`train.py --dry_run`: the resolved config and what it builds, without training or any workdir.

Prints the config as the run would save it (config.json), then one block for the model: its
ViTConfig, parameter count, tokens per image and FLOPs per image (forward, from XLA's cost
analysis of the compiled model), and the run's length and batch. It runs every check a real start
runs before touching the workdir, so a config that passes here starts (the workdir's own checks
aside). It downloads nothing: a TFDS dataset not yet prepared is named instead.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from vit_jax.model import vit
from vit_jax.train import plan


def forward_flops(model: vit.VisionTransformer, params_shapes) -> float | None:
    """FLOPs of one image through the model (inference), or None when the backend has none."""
    images = vit.dummy_input(model.config, batch_size=1)
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params_shapes, images)
    analysis = compiled.compile().cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def print_dry_run(config: ml_collections.ConfigDict) -> None:
    run = plan.plan_run(config, prepare=False)
    model_config, data, mesh = run.vit_config, run.data, run.mesh
    grid = list(model_config.grid_size)
    tokens = math.prod(grid) + model_config.num_prefix_tokens
    flops = forward_flops(run.model, run.shapes["params"])
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    print(f"model: {model_config}")
    print(
        f"parameters: {vit.count_params(run.shapes['params']):,} | tokens per image: {tokens} "
        f"({grid[0]}x{grid[1]} patches + {model_config.num_prefix_tokens} prefix) | "
        + (f"forward GFLOPs per image: {flops / 1e9:.4g}" if flops else "FLOPs: not reported")
    )
    print(
        f"run: {run.total_steps} steps of {config.batch_size} examples "
        f"({run.total_steps * config.batch_size / data.num_train_examples:.1f} epochs of "
        f"{data.num_train_examples:,} examples, {data.num_classes} classes) on mesh "
        f"{dict(mesh.shape)} of {jax.device_count()} {jax.default_backend()} device(s)"
    )
    print("dry run: nothing was trained or written.")
