"""Deployment as a LiteRT / TFLite flatbuffer, run by the LiteRT interpreter (`ai-edge-litert`).

    save_pretrained(params, "model.tflite", format="tflite", model=config, batch=1)
    save_pretrained(..., quantize="dynamic_int8")   # int8 weights, float activations (~4x smaller)

Route: jax2tf (a tf.function, as for the SavedModel) → `tf.lite.TFLiteConverter` with the TFLite
builtin ops only, at a static batch. A dynamic batch does not convert with TensorFlow 2.21: the
MAP head's (and other) gathers lower to `vhlo.dynamic_gather_v1`, which the converter rejects
("'vhlo.dynamic_gather_v1' op is not part of the vhlo support yet"); so a file has one batch size
(`batch`, default 1) and `vit_jax.interop.deploy.common.Runner` feeds it in chunks.
`quantize='dynamic_int8'` is the converter's dynamic-range quantization (`Optimize.DEFAULT`
without a representative dataset).

With `with_preprocessing` the uint8 input is (batch, -1, -1, C): any height and width, the batch
static. The JAX preprocessing cannot come along for that (a symbolic image size makes jax2tf emit
dynamic StableHLO ops, which the converter refuses as it does the dynamic batch), and
`tf.image.resize(antialias=True)` is TF's ScaleAndTranslate, not a TFLite builtin; so
`preprocess_tf` writes `common.preprocess_graph` in TF ops that are (the resize as two matrix
products with `common.resize_weights`' triangle filter, computed from the input's shape), ahead of
the static-shape jax2tf model, and the two convert together. The LiteRT interpreter takes each new
size by `resize_tensor_input` + `allocate_tensors` (`load` does it when the shape changes).
Measured against `common.forward` (the JAX resize + model), the tests' random weights, inputs of
1x1 ... 64x48 (up, down and the model's own size), batch 1 and 3: logits within 3.6e-7
(tests/test_deploy.py checks 1e-4 and prints it); `quantize` works on such a file too. With `input_size` the input has that fixed size and jax2tf carries the JAX preprocessing.

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


def _resize_weights(tf, n, out: int):
    """`common.resize_weights` in TF ops (`n`: a scalar int32 tensor, the input's length)."""
    inverse = tf.cast(n, tf.float32) / out
    width = tf.maximum(inverse, 1.0)
    sample = (tf.range(out, dtype=tf.float32) + 0.5) * inverse - 0.5
    source = tf.cast(tf.range(n), tf.float32)
    weights = tf.maximum(0.0, 1.0 - tf.abs(sample[None, :] - source[:, None]) / width)
    total = tf.reduce_sum(weights, axis=0, keepdims=True)
    return weights / tf.where(total > 0, total, tf.ones_like(total))  # (n, out)


def preprocess_tf(tf, pixels, config, pre):
    """uint8 (B, h, w, C) of any h, w → the model's float inputs, in TFLite builtin ops, as
    `common.preprocess_graph` does (the resize: two matrix products with the same weights)."""
    x = tf.cast(pixels, tf.float32)
    c = config.num_channels
    if pre.polarity == "white_on_black":  # a light border: dark-on-light, inverted
        edges = (x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1])
        border = tf.add_n([tf.reduce_sum(e, axis=(1, 2)) for e in edges])
        hw = tf.cast(tf.shape(x)[1] + tf.shape(x)[2], tf.float32)
        light = border / (2.0 * c * hw) > 127.5
        x = tf.where(light[:, None, None, None], 255.0 - x, x)
    if pre.channel_order == "BGR" and c == 3:
        x = tf.reverse(x, axis=[3])
    rows = _resize_weights(tf, tf.shape(x)[1], config.image_size[0])  # (h, H)
    cols = _resize_weights(tf, tf.shape(x)[2], config.image_size[1])  # (w, W)
    x = tf.transpose(x, (0, 3, 1, 2))  # (B, C, h, w)
    x = tf.matmul(tf.matmul(tf.transpose(rows), x), cols)  # (B, C, H, W)
    x = tf.transpose(x, (0, 2, 3, 1))
    mean, std = pre.mean_std(c, 255.0)
    return (tf.clip_by_value(x, 0.0, 255.0) - mean) / std


def export_pixels(fn, spec, config, pre, path: str, meta, options: common.Options) -> None:
    """With preprocessing, any image size: TF ops resize (`preprocess_tf`) ahead of the model
    alone (`fn`, float `spec`), converted together; the file's input is (batch, -1, -1, C)."""
    tf = common.require("tensorflow", NAME)
    from vit_jax.interop.deploy import savedmodel

    body = savedmodel.tf_function(fn, spec, tf, polymorphic=False)
    shape = (spec[0][0], None, None, config.num_channels)

    def serve(images):
        return body(tf.ensure_shape(preprocess_tf(tf, images, config, pre), spec[0]))

    signature = [tf.TensorSpec(shape, tf.uint8, name="images")]
    _convert(tf, tf.function(serve, input_signature=signature, autograph=False), path, meta,
             options)  # fmt: skip


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    tf = common.require("tensorflow", NAME)
    from vit_jax.interop.deploy import savedmodel

    _convert(tf, savedmodel.tf_function(fn, spec, tf, polymorphic=False), path, meta, options)


def _convert(tf, function, path: str, meta: dict[str, Any], options: common.Options) -> None:
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
        if tuple(interpreter.get_input_details()[0]["shape"]) != x.shape:  # any-size pixels
            interpreter.resize_tensor_input(source["index"], x.shape, strict=True)
            interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(result["index"]).copy()

    return common.Runner(run, read_metadata(flatbuffer))
