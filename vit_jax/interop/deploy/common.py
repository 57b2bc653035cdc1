"""What every deployment format shares: the traced function, its input, its description, the
optional packages, and writing a file or folder whole.

    fn, spec = forward(params, config, preprocessing, options)   # a jax function + its input
    meta = describe(config, preprocessing, labels, options, "onnx", spec)

Without `with_preprocessing` the function takes float32 (batch, H, W, C) model inputs, normalized as
the input convention says. With it, uint8 (batch, h, w, C) pixels: inverted when the model expects
another polarity (judged per image by its border, as `Preprocessing.orient` does), channel order,
bilinear antialiased resize to the model's size and normalization are all in the graph. The resize
is a pair of weight matrices (`resize_weights`), the same triangle filter as `jax.image.resize`
(antialias=True), written out because it then traces for every exporter, also with a symbolic
height and width, which `jax.image.resize` is not for jax2onnx. This function is the reference: ONNX
and TFLite files that take any image size (where jax2onnx and the TFLite converter cannot take a
symbolic size through) write the same steps in their own ops ahead of the model alone
(`onnx_format.prepend_preprocessing`, `tflite.preprocess_tf`), tested against it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.interop.input_convention import Preprocessing
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer

QUANTIZATIONS = ("dynamic_int8",)
# pip names and the versions tested (requirements.txt pins the same).
PACKAGES = {
    "jax2onnx": "jax2onnx==0.17.1",
    "onnx": "onnx==1.23.2",
    "onnxruntime": "onnxruntime==1.32.0",
    "ai_edge_litert": "ai-edge-litert==2.3.0",
    "tensorflow": "tensorflow-cpu==2.21.0",
}


@dataclasses.dataclass(frozen=True)
class Options:
    """How a model is exported, beyond its params: see `vit_jax.interop.deploy`."""

    with_preprocessing: bool = False
    quantize: str | None = None  # 'dynamic_int8' (tflite only)
    batch: int | None = None  # a static batch size; None: dynamic where the format can
    input_size: tuple[int, int] | None = None  # uint8 input size with preprocessing; None: any


def require(module: str, format: str, purpose: str = "export"):
    """`importlib.import_module(module)`, or one ImportError naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pip = PACKAGES.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(
            f"format {format!r} needs the package {pip.split('==')[0]!r} to {purpose} "
            f"(pip install {pip})"
        ) from None


def preprocessing_problems(pre: Preprocessing, options: Options) -> list[str]:
    """What of the input convention the in-graph preprocessing cannot do."""
    if options.with_preprocessing and pre.resize != "bilinear":
        return [f"resize={pre.resize!r} with --with_preprocessing (only bilinear is in the graph)"]
    return []


def resize_weights(in_size, out_size: int) -> jnp.ndarray:
    """(in_size, out_size) weights of an antialiased bilinear resize along one axis: a triangle
    filter widened by the downscale factor, normalized per output sample (jax.image.resize's
    definition; `in_size` may be a symbolic dimension)."""
    n = jnp.asarray(in_size, jnp.float32)
    inverse = n / out_size
    width = jnp.maximum(inverse, 1.0)
    sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inverse - 0.5
    source = jnp.arange(in_size).astype(jnp.float32)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[None, :] - source[:, None]) / width)
    total = weights.sum(axis=0, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    inside = (sample >= -0.5) & (sample <= n - 0.5)
    return jnp.where(inside[None, :], weights, 0.0)


def preprocess_graph(pixels: jnp.ndarray, config: ViTConfig, pre: Preprocessing) -> jnp.ndarray:
    """uint8 (B, h, w, C) → float32 model inputs, as `Preprocessing.apply` does per image."""
    x = pixels.astype(jnp.float32)
    if pre.polarity == "white_on_black":  # a light border: dark-on-light, inverted
        h, w, c = x.shape[1:]
        border = sum(e.sum(axis=(1, 2)) for e in (x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]))
        count = 2.0 * (jnp.asarray(h, jnp.float32) + jnp.asarray(w, jnp.float32)) * c
        x = jnp.where((border / count > 127.5)[:, None, None, None], 255.0 - x, x)
    if pre.channel_order == "BGR" and config.num_channels == 3:
        x = x[..., ::-1]
    rows = resize_weights(x.shape[1], config.image_size[0])
    cols = resize_weights(x.shape[2], config.image_size[1])
    x = jnp.einsum("bhwc,hH,wW->bHWc", x, rows, cols)
    channels = config.num_channels
    mean, std = pre.mean_std(channels, 255.0)
    return (jnp.clip(x, 0.0, 255.0) - mean) / std


def forward(params: Any, config: ViTConfig, pre: Preprocessing, options: Options):
    """(function of one image batch → logits, its input (shape with None where dynamic, dtype))."""
    model = VisionTransformer(config)
    params = jax.tree.map(jnp.asarray, params)
    batch = options.batch
    if options.with_preprocessing:
        size = options.input_size or (None, None)

        def fn(pixels):
            return model.apply({"params": params}, preprocess_graph(pixels, config, pre))

        return fn, ((batch, *size, config.num_channels), np.uint8)

    def fn(images):
        return model.apply({"params": params}, images)

    return fn, ((batch, *config.image_size, config.num_channels), np.float32)


def describe(
    config: ViTConfig,
    pre: Preprocessing,
    labels: Sequence[str] | None,
    options: Options,
    format: str,
    spec: tuple[tuple, Any],
) -> dict[str, Any]:
    """The input convention a caller needs to feed the file (each format stores it its own way)."""
    shape, dtype = spec
    return {
        "format": format,
        "input": {
            "shape": [d if d is not None else -1 for d in shape],  # -1: any size
            "dtype": np.dtype(dtype).name,
            "layout": "NHWC",
            "image_size": list(config.image_size),
            "channels": config.num_channels,
            "with_preprocessing": options.with_preprocessing,
        },
        "quantize": options.quantize,
        "preprocessing": pre.to_dict(),
        "labels": list(labels) if labels is not None else None,
        "config": config.to_dict(),
    }


def write_folder_whole(path: str, build, overwrite: bool) -> None:
    """`build(tmp)` fills a new folder beside `path`, which then takes its place: a failed build
    leaves nothing, and an existing folder (allowed by `overwrite`) is replaced only at the end."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        build(tmp)
        old = None
        if os.path.isdir(path):
            if os.listdir(path) and not overwrite:
                raise FileExistsError(f"{path} appeared during the export; nothing replaced")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Runner:
    """A deployed file loaded in its runtime: `runner(images) → logits` (numpy), any batch size
    (a static-batch file is fed in chunks, the last one padded), and `runner.meta`."""

    def __init__(self, run_batch, meta: dict[str, Any]):
        self._run, self.meta = run_batch, meta
        batch = meta["input"]["shape"][0]
        self.static_batch = None if batch == -1 else batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self.meta["input"]["dtype"])
        images = np.asarray(images, dtype)
        step = self.static_batch
        if step is None:
            return np.asarray(self._run(images))
        outs = []
        for i in range(0, len(images), step):
            chunk = images[i : i + step]
            pad = step - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype)])
            outs.append(np.asarray(self._run(chunk))[: step - pad])
        return np.concatenate(outs)
