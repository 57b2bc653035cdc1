r"""Model throughput: images/s, FLOPs and MFU of the jitted train step and of inference.

  python -m vit_jax.benchmark --variant ViT-B/16 --batch_size 64 --dtype bfloat16 --peak_tflops 989

The train step is the trainer's own (`train_step.make_train_step`, AdamW, data-parallel over every
local device); inference is a jitted `model.apply`. Each figure is the median of `--repeats` timed
runs of `--steps` steps, after one untimed run that compiles. FLOPs per image come from XLA's cost
analysis of the compiled computation, so MFU = achieved FLOP/s / (`--peak_tflops` × devices).
Input data is synthetic and already on the devices: this measures the model alone (for the input
pipeline alone see `python -m vit_jax.data.input_benchmark`). Prints one JSON line per mode.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from vit_jax import models
from vit_jax import sharding as sharding_lib
from vit_jax import train_step as train_step_lib


def compiled_flops(jitted, *args) -> float | None:
    """FLOPs of one call, from XLA's cost analysis (None when the backend does not report them)."""
    analysis = jitted.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def time_runs(run_steps, steps: int, repeats: int) -> list[float]:
    """Seconds per step of each timed run (the first, compiling run is not timed)."""
    run_steps(1)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_steps(steps)
        seconds.append((time.perf_counter() - start) / steps)
    return seconds


def benchmark(
    variant: str | None,
    *,
    mode: str = "train",
    batch_size: int = 32,
    steps: int = 5,
    repeats: int = 3,
    peak_tflops: float | None = None,
    **model_overrides,
) -> dict[str, Any]:
    if mode not in ("train", "inference"):
        raise ValueError(f"mode={mode!r}; allowed: train, inference")
    model = models.create_model(variant, **model_overrides)
    cfg = model.config
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
    sharding_lib.check_batch_size(batch_size, mesh, "batch_size")
    params = models.init_params(model, jax.random.key(0))
    images = jnp.zeros((batch_size, *cfg.image_size, cfg.num_channels), jnp.float32)
    batch = sharding_lib.make_global_batch(
        {
            "image": images,
            "label": jax.nn.one_hot(jnp.zeros(batch_size, jnp.int32), max(cfg.num_classes, 1)),
        },
        mesh,
    )

    if mode == "train":
        tx = optax.adamw(1e-4)
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        shardings = sharding_lib.tree_shardings(state, mesh, fsdp_min_size=2**60)
        state = jax.device_put(state, shardings)
        step = train_step_lib.make_train_step(model, tx, mesh, shardings)
        flops = compiled_flops(step, state, batch)
        holder = [state]

        def run_steps(n):
            for _ in range(n):
                holder[0], metrics = step(holder[0], batch)
            jax.block_until_ready(metrics["loss"])

    else:
        params = jax.device_put(params, sharding_lib.replicated(mesh))
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        flops = compiled_flops(forward, params, batch["image"])

        def run_steps(n):
            for _ in range(n):
                logits = forward(params, batch["image"])
            jax.block_until_ready(logits)

    seconds = statistics.median(time_runs(run_steps, steps, repeats))
    result = {
        "mode": mode,
        "variant": variant or "custom",
        "image_size": list(cfg.image_size),
        "dtype": cfg.dtype,
        "batch_size": batch_size,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "median_step_s": seconds,
        "images_per_s": batch_size / seconds,
        "gflops_per_image": flops / batch_size / 1e9 if flops else None,
    }
    if flops and peak_tflops:
        result["mfu"] = flops / seconds / (peak_tflops * 1e12 * jax.device_count())
    return result


_VARIANT = flags.DEFINE_string("variant", "ViT-B/16", "Model variant, e.g. ViT-Ti/16.")
_MODES = flags.DEFINE_list("modes", ["train", "inference"], "train and/or inference.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Square image side.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Activation dtype: float32 | bfloat16.")
_ATTENTION = flags.DEFINE_string("attention_impl", "xla", "xla | cudnn | auto.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the median is reported.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for MFU.")


def main(argv):
    del argv
    for mode in _MODES.value:
        result = benchmark(
            _VARIANT.value,
            mode=mode,
            batch_size=_BATCH.value,
            steps=_STEPS.value,
            repeats=_REPEATS.value,
            peak_tflops=_PEAK.value,
            image_size=_IMAGE.value,
            dtype=_DTYPE.value,
            attention_impl=_ATTENTION.value,
        )
        print(json.dumps(result), flush=True)


def run() -> None:
    """The `vit-benchmark` console script."""
    sys.modules["__main__"].__doc__ = __doc__  # what absl's --help prints
    app.run(main)


if __name__ == "__main__":
    run()
