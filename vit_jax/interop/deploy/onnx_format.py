"""Deployment as ONNX (opset 18, float32, a dynamic batch axis), run by `onnxruntime`.

    save_pretrained(params, "model.onnx", format="onnx", model=config)
    session = onnxruntime.InferenceSession("model.onnx")
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]

The exporter is `jax2onnx` (0.17.1), which turns the jaxpr of our forward pass into ONNX ops
directly. The other maintained route, `jax2tf` + `tf2onnx` (1.17.0), does not work with JAX 0.10:
`jax2tf` only has native serialization now, so the TF graph is a single `XlaCallModule` op holding
the StableHLO program, and tf2onnx has no converter for it ("pass1 convert failed for name:
XlaCallModule", then "ValueError: Could not infer the attribute type"). jax2onnx declares
`orbax-checkpoint<0.11.37` although it never imports orbax (only some of its plugins for other
libraries need equinox, dm_pix, ...), so it is installed with `--no-deps` beside our orbax pin
(requirements-deploy.txt; its import-time warnings for those absent plugins are silenced).

The input convention (and the full ViTConfig) is the JSON of `metadata_props["vit_jax"]`, read by
`onnxruntime` as `session.get_modelmeta().custom_metadata_map["vit_jax"]`. With
`with_preprocessing` the input is uint8 of a fixed height and width (`input_size`, default the
model's): jax2onnx cannot trace a symbolic image size through the resize.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from vit_jax import integrity
from vit_jax.interop.deploy import common

NAME = "onnx"
SUFFIXES = (".onnx",)
RUNTIME = "onnxruntime"
OPSET = 18
METADATA_KEY = "vit_jax"


def outputs(path: str) -> list[str]:
    return [os.fspath(path)]


def unrepresentable(config, options: common.Options) -> list[str]:
    problems = [f"quantize={options.quantize!r} (tflite only)"] if options.quantize else []
    if options.with_preprocessing and options.input_size is None:
        problems.append(
            "uint8 images of any size with --with_preprocessing (jax2onnx needs a static height "
            "and width: give --input_size)"
        )
    return problems


def _jax2onnx():
    # Its plugin discovery imports every plugin, also those for libraries we do not install.
    for name in ("jax2onnx", "jax2onnx.plugins.plugin_system", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return common.require("jax2onnx", NAME)


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    jax2onnx = _jax2onnx()
    onnx = common.require("onnx", NAME)
    shape, dtype = spec
    names = iter(("batch", "height", "width"))
    dims = tuple(next(names) if d is None else d for d in shape)
    model = jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct(dims, dtype)], opset=OPSET)
    entry = onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    model.metadata_props.append(entry)
    model.doc_string = "vit_jax ViT; input convention in metadata_props['vit_jax']"
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    integrity.write_whole(path, model.SerializeToString())


def load(path: str) -> common.Runner:
    ort = common.require("onnxruntime", NAME, "run it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file")
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
    name = session.get_inputs()[0].name
    return common.Runner(lambda x: session.run(None, {name: x})[0], meta)
