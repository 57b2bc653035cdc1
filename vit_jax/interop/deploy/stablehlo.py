"""Deployment as a serialized StableHLO program (`jax.export`): runs without this project's code.

    save_pretrained(params, "model.stablehlo", format="stablehlo", model=config)  # + .json beside
    program, meta = load_stablehlo("model.stablehlo")
    logits = program.call(images)            # float32 (batch, H, W, C), any batch

The blob is `jax.export.Exported.serialize()`: versioned by JAX's StableHLO serialization
(`jax.export` keeps old versions loadable for months), with the params baked in as constants, so
reloading needs only `jax` (`jax.export.deserialize`), never the Flax model. The batch axis is
symbolic ('b'), so one file serves every batch size (with `with_preprocessing` the height and width
of the uint8 input too). It is lowered for CPU and CUDA, so a GPU server runs the same file. The JSON
beside it carries the input convention (image size, channels, mean/std, channel order, polarity,
labels when known) and the full `ViTConfig`, because a program has no room for metadata of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from vit_jax import integrity
from vit_jax.interop.deploy import common

NAME = "stablehlo"
SUFFIXES = (".stablehlo",)
RUNTIME = "jax"  # the module that runs it
# Platforms the program is lowered for; CPU always, CUDA so a GPU server runs the same file.
PLATFORMS = ("cpu", "cuda")


def metadata_path(path: str) -> str:
    return os.fspath(path) + ".json"


def outputs(path: str) -> list[str]:
    return [os.fspath(path), metadata_path(path)]


def unrepresentable(config, options: common.Options) -> list[str]:
    return [f"quantize={options.quantize!r} (tflite only)"] if options.quantize else []


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    shape, dtype = spec
    names = iter(("b", "h", "w"))
    dims = [next(names) if d is None else str(d) for d in shape]
    symbolic = jax.export.symbolic_shape(", ".join(dims))
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(
        jax.ShapeDtypeStruct(symbolic, dtype)
    )
    blob = bytes(exported.serialize())
    text = json.dumps(meta, indent=1, sort_keys=True)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    integrity.write_whole(path, blob)  # both or neither under the real names
    try:
        integrity.write_whole(metadata_path(path), text.encode())
    except BaseException:
        os.remove(path)  # a program without its input convention is not a deployable file
        raise


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


def load(path: str) -> common.Runner:
    program, meta = load_stablehlo(path)
    return common.Runner(lambda x: np.asarray(program.call(x)), meta)
