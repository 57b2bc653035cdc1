"""Deployment as a LiteRT / TFLite flatbuffer, run by the LiteRT interpreter (`ai-edge-litert`).

    save_pretrained(params, "model.tflite", format="tflite", model=config, batch=1)
    save_pretrained(..., quantize="dynamic_int8")   # int8 weights, float activations (~4x smaller)

Route: jax2tf (a tf.function, as for the SavedModel) → `tf.lite.TFLiteConverter` with the TFLite
builtin ops only, at a static batch. A dynamic batch does not convert with TensorFlow 2.21: the
MAP head's (and other) gathers lower to `vhlo.dynamic_gather_v1`, which the converter rejects
("'vhlo.dynamic_gather_v1' op is not part of the vhlo support yet"); so a file has one batch size
(`batch`, default 1) and `vit_jax.interop.deploy.common.Runner` feeds it in chunks. With
`with_preprocessing` the uint8 input has a fixed height and width too (`input_size`, default the
model's). `quantize='dynamic_int8'` is the converter's dynamic-range quantization
(`Optimize.DEFAULT` without a representative dataset).

The input convention is a TFLite metadata entry named "vit_jax" (a buffer holding the JSON), read
back with the flatbuffer schema that `ai-edge-litert` ships.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vit_jax import integrity
from vit_jax.interop.deploy import common

NAME = "tflite"
SUFFIXES = (".tflite",)
RUNTIME = "ai_edge_litert"
METADATA_NAME = "vit_jax"
DEFAULT_BATCH = 1


def outputs(path: str) -> list[str]:
    return [os.fspath(path)]


def unrepresentable(config, options: common.Options) -> list[str]:
    if options.quantize not in (None, *common.QUANTIZATIONS):
        return [f"quantize={options.quantize!r} (allowed: {', '.join(common.QUANTIZATIONS)})"]
    if options.with_preprocessing and options.input_size is None:
        return ["uint8 images of any size with --with_preprocessing (give --input_size)"]
    return []


def with_static_batch(options: common.Options) -> common.Options:
    import dataclasses

    return dataclasses.replace(options, batch=options.batch or DEFAULT_BATCH)


def _add_metadata(flatbuffer: bytes, text: str) -> bytes:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(text.encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    tf = common.require("tensorflow", NAME)
    from vit_jax.interop.deploy import savedmodel

    function = savedmodel.tf_function(fn, spec, tf, polymorphic=False)
    module = tf.Module()
    module.serve = function
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], module
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if options.quantize == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    flatbuffer = _add_metadata(converter.convert(), json.dumps(meta, sort_keys=True))
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    integrity.write_whole(path, flatbuffer)


def read_metadata(flatbuffer: bytes) -> dict[str, Any]:
    """The "vit_jax" metadata JSON of a TFLite flatbuffer ({} when there is none)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


def load(path: str) -> common.Runner:
    litert = common.require("ai_edge_litert.interpreter", NAME, "run it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file")
    with open(path, "rb") as f:
        flatbuffer = f.read()
    interpreter = litert.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(result["index"]).copy()

    return common.Runner(run, read_metadata(flatbuffer))
