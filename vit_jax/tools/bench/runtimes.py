"""`benchmark --runtime onnx,tflite,savedmodel,stablehlo`: inference images/s of the exported file
in its own runtime, timed alternately with our jitted `model.apply` on the same inputs (so load
from other processes hits both alike), plus the file's size and how long the export took.

The model has random weights (speed does not depend on them); TFLite is exported at the benchmark's
batch size (its files have a static batch). JAX runs on one CPU device with XLA's intra-op threads,
as each runtime does with its own thread pool.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from vit_jax.interop import deploy
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer, init_params

NAMES = {
    "onnx": "m.onnx",
    "savedmodel": "m_savedmodel",
    "tflite": "m.tflite",
    "stablehlo": "m.stablehlo",
}


def size_of(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    extra = deploy.stablehlo.metadata_path(path)
    return os.path.getsize(path) + (os.path.getsize(extra) if path.endswith(".stablehlo") else 0)


def check(runtimes) -> None:
    unknown = [r for r in runtimes if r not in NAMES]
    if unknown:
        raise ValueError(
            f"--runtime={','.join(runtimes)}: {unknown[0]!r} is not one of {list(NAMES)}"
        )


def measure(
    config: ViTConfig, batch_size: int, runtimes, steps: int, repeats: int
) -> list[dict[str, Any]]:
    """One row per runtime: images/s of the file and of JAX, their ratio, size, export time."""
    check(runtimes)
    model = VisionTransformer(config)
    params = jax.jit(lambda key: init_params(model, key))(jax.random.key(0))
    shape = (batch_size, *config.image_size, config.num_channels)
    images = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    ours = jax.jit(lambda p, x: model.apply({"params": p}, x))
    jax.block_until_ready(ours(params, images))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for runtime in runtimes:
            path = os.path.join(folder, NAMES[runtime])
            start = time.perf_counter()
            batch = batch_size if runtime == "tflite" else None
            deploy.export(params, config, path, runtime, batch=batch)
            export_s = time.perf_counter() - start
            runner = deploy.load(path)
            runner(images)  # compile / warm up
            sides = {
                runtime: lambda runner=runner: runner(images),
                "jax": lambda: jax.block_until_ready(ours(params, images)),
            }
            seconds = {name: [] for name in sides}
            for _ in range(repeats):
                for name, step in sides.items():
                    start = time.perf_counter()
                    for _ in range(steps):
                        step()
                    seconds[name].append((time.perf_counter() - start) / steps)
            speed = {name: batch_size / statistics.median(s) for name, s in seconds.items()}
            rows.append(
                {
                    "runtime": runtime,
                    "batch_size": batch_size,
                    "images_per_s": round(speed[runtime], 2),
                    "jax_images_per_s": round(speed["jax"], 2),
                    "ratio_to_jax": round(speed[runtime] / speed["jax"], 3),
                    "file_mb": round(size_of(path) / 2**20, 1),
                    "export_s": round(export_s, 1),
                }
            )
    return rows


def format_rows(rows, variant: str) -> str:
    lines = [
        f"{'runtime':<11} {'variant':<10} {'batch':>5} {'img/s':>9} {'jax img/s':>9} "
        f"{'ratio':>6} {'file MB':>8} {'export s':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['runtime']:<11} {variant:<10} {r['batch_size']:>5} {r['images_per_s']:>9.1f} "
            f"{r['jax_images_per_s']:>9.1f} {r['ratio_to_jax']:>6.2f} {r['file_mb']:>8.1f} "
            f"{r['export_s']:>8.1f}"
        )
    return "\n".join(lines)
