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
`onnxruntime` as `session.get_modelmeta().custom_metadata_map["vit_jax"]`.

With `with_preprocessing` the input is uint8 (batch, height, width, C) of any height and width:
jax2onnx cannot trace a symbolic image size through the resize, so it exports the model alone
(float input at the model's size) and `prepend_preprocessing` puts standard ONNX ops ahead of it:
Cast, the polarity test on the border (Slice, ReduceSum, Where), the channel flip for BGR (Gather),
`Resize` (mode='linear', antialias=1, coordinate_transformation_mode='half_pixel',
exclude_outside=1: jax.image.resize's antialiased triangle filter; with exclude_outside=0, the
default, the taps beyond the border stay in the normalization and a 2x downscale is off by up to
15 of 255), the clip to [0, 255] and the normalization. Measured against `common.forward` (the
JAX resize + model), the tests' random weights, batch 1 and 3, inputs of 1x1 ... 64x48 (up, down
and the model's own size): logits within 3.9e-7 (tests/test_deploy.py checks 1e-4 and prints it). With `input_size` the
uint8 input has that fixed size and jax2onnx traces the JAX preprocessing itself
(`common.preprocess_graph`).
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
    return [f"quantize={options.quantize!r} (tflite only)"] if options.quantize else []


def _jax2onnx():
    # Its plugin discovery imports every plugin, also those for libraries we do not install.
    for name in ("jax2onnx", "jax2onnx.plugins.plugin_system", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return common.require("jax2onnx", NAME)


def _to_onnx(fn, spec):
    jax2onnx = _jax2onnx()
    shape, dtype = spec
    names = iter(("batch", "height", "width"))
    dims = tuple(next(names) if d is None else d for d in shape)
    return jax2onnx.to_onnx(fn, [jax.ShapeDtypeStruct(dims, dtype)], opset=OPSET)


def prepend_preprocessing(model, config, pre) -> None:
    """Turn `model` (float32 (batch, H, W, C) inputs at the model's size) into one that takes uint8
    (batch, height, width, C) pixels of any size, with ONNX ops doing what
    `common.preprocess_graph` does (see the module docstring)."""
    onnx = common.require("onnx", NAME)
    helper, T = onnx.helper, onnx.TensorProto
    graph, c = model.graph, config.num_channels
    body_input = graph.input[0]
    name = lambda n: f"vit_jax_preprocess/{n}"
    nodes, constants = [], []

    def const(n, values, dtype=T.FLOAT):
        constants.append(helper.make_tensor(name(n), dtype, [len(values)], list(values)))
        return name(n)

    def node(op, inputs, **attrs):
        out = name(f"{op.lower()}_{len(nodes)}")
        nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    x = node("Cast", ["pixels"], to=T.FLOAT)
    if pre.polarity == "white_on_black":  # a light border: dark-on-light, inverted
        axes, edges = const("sum_axes", [1, 2, 3], T.INT64), []
        for axis in (1, 2):  # the first and the last row, then column
            for begin, end in ((0, 1), (-1, 2**62)):
                bounds = [const(f"{k}{axis}{begin}", [v], T.INT64) for k, v in
                          (("begin", begin), ("end", end), ("axis", axis))]  # fmt: skip
                edge = node("Slice", [x, *bounds])
                edges.append(node("ReduceSum", [edge, axes], keepdims=0))
        border = node("Sum", edges)
        shape = node("Shape", [x])
        hw = node(
            "ReduceSum",
            [node("Slice", [shape, const("hw0", [1], T.INT64), const("hw1", [3], T.INT64)])],
            keepdims=0,
        )
        count = node("Mul", [node("Cast", [hw], to=T.FLOAT), const("twice_c", [2.0 * c])])
        light = node("Greater", [node("Div", [border, count]), const("half", [127.5])])
        light = node("Reshape", [light, const("b111", [-1, 1, 1, 1], T.INT64)])
        x = node("Where", [light, node("Sub", [const("white", [255.0]), x]), x])
    if pre.channel_order == "BGR" and c == 3:
        x = node("Gather", [x, const("bgr", [2, 1, 0], T.INT64)], axis=3)
    x = node(
        "Resize",
        [x, "", "", const("size", list(config.image_size), T.INT64)],
        mode="linear",
        antialias=1,
        exclude_outside=1,
        coordinate_transformation_mode="half_pixel",
        axes=[1, 2],
    )
    x = node("Min", [node("Max", [x, const("zero", [0.0])]), const("max", [255.0])])  # the clip
    pixel_mean, pixel_std = pre.mean_std(c, 255.0)
    mean, std = const("mean", pixel_mean), const("std", pixel_std)
    nodes.append(helper.make_node("Div", [node("Sub", [x, mean]), std], [body_input.name]))
    pixels = helper.make_tensor_value_info("pixels", T.UINT8, ["batch", "height", "width", c])
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    graph.initializer.extend(constants)
    del graph.input[:]
    graph.input.append(pixels)


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    _write(_to_onnx(fn, spec), path, meta)


def export_pixels(fn, spec, config, pre, path: str, meta: dict[str, Any], options) -> None:
    """With preprocessing, any image size: `fn` is the model alone (`spec` its float input)."""
    model = _to_onnx(fn, spec)
    prepend_preprocessing(model, config, pre)
    common.require("onnx", NAME).checker.check_model(model)
    _write(model, path, meta)


def _write(model, path: str, meta: dict[str, Any]) -> None:
    onnx = common.require("onnx", NAME)
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
