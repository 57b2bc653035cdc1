"""Deployment as a serialized StableHLO program (`jax.export`): runs without this project's code.

    export_stablehlo(params, config, "model.stablehlo", preprocessing)   # + model.stablehlo.json
    program, meta = load_stablehlo("model.stablehlo")
    logits = program.call(images)            # float32 (batch, H, W, C), any batch

The blob is `jax.export.Exported.serialize()`: versioned by JAX's StableHLO serialization
(`jax.export` keeps old versions loadable for months), with the params baked in as constants, so
reloading needs only `jax` (`jax.export.deserialize`), never the Flax model. The batch axis is
symbolic ('b'), so one file serves every batch size. The JSON beside it carries the input
convention (image size, channels, mean/std, channel order, polarity, labels when known) and the
full `ViTConfig`, because a program has no room for metadata of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax import integrity
from vit_jax.interop import save
from vit_jax.interop.input_convention import DEFAULT, Preprocessing
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer

SUFFIX = ".stablehlo"
# Platforms the program is lowered for; CPU always, CUDA so a GPU server runs the same file.
PLATFORMS = ("cpu", "cuda")


def metadata_path(path: str) -> str:
    return os.fspath(path) + ".json"


def check_destination(path: str, overwrite: bool = False) -> None:
    """ValueError naming `path` before anything is traced or written."""
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise ValueError(f"{path}: format 'stablehlo' writes a {SUFFIX} file")
    save.check_outputs((path, metadata_path(path)), overwrite)


def describe(
    config: ViTConfig, preprocessing: Preprocessing, labels: Sequence[str] | None
) -> dict[str, Any]:
    """The input convention a caller needs to feed the program (what the JSON beside it holds)."""
    return {
        "format": "stablehlo",
        "input": {
            "layout": "NHWC float32, batch dynamic",
            "image_size": list(config.image_size),
            "channels": config.num_channels,
        },
        "preprocessing": preprocessing.to_dict(),
        "labels": list(labels) if labels is not None else None,
        "config": config.to_dict(),
    }


def export_stablehlo(
    params: Any,
    config: ViTConfig,
    path: str,
    preprocessing: Preprocessing | None = None,
    labels: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Trace `config`'s model with `params` as constants, serialize it to `path` (+ `.json`)."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    if labels is not None and len(labels) != config.num_classes:
        raise ValueError(f"{len(labels)} labels for a model of {config.num_classes} classes")
    model = VisionTransformer(config)
    params = jax.tree.map(jnp.asarray, params)

    def forward(images):
        return model.apply({"params": params}, images)

    (batch,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *config.image_size, config.num_channels), jnp.float32)
    exported = jax.export.export(jax.jit(forward), platforms=PLATFORMS)(spec)
    blob = bytes(exported.serialize())
    meta = json.dumps(describe(config, preprocessing or DEFAULT, labels), indent=1, sort_keys=True)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    # Both or neither under the real names (a failed trace above wrote nothing yet).
    integrity.write_whole(path, blob)
    try:
        integrity.write_whole(metadata_path(path), meta.encode())
    except BaseException:
        os.remove(path)  # a program without its input convention is not a deployable file
        raise
    return path


def load_stablehlo(path: str) -> tuple[jax.export.Exported, dict[str, Any]]:
    """The deserialized program and the JSON beside it; needs only `jax`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    meta_file = metadata_path(path)
    meta = json.loads(pathlib.Path(meta_file).read_text()) if os.path.isfile(meta_file) else {}
    return exported, meta
