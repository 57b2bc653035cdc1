"""Deployment as a TF SavedModel (`jax.experimental.jax2tf`), run by `tf.saved_model.load`.

    save_pretrained(params, "model_savedmodel", format="savedmodel", model=config)   # a folder
    serve = tf.saved_model.load("model_savedmodel").signatures["serving_default"]
    logits = serve(images=tf.constant(images))["logits"]

The `serving_default` signature takes `images` with a dynamic batch (and, with
`with_preprocessing`, uint8 of any height and width) and returns `logits`. jax2tf serializes the
forward pass natively (one `XlaCallModule` op holding the StableHLO program, params as constants,
lowered for CPU). The input convention is `assets/vit_jax.json`, and also the string constant
`vit_jax_metadata` of the loaded object. The folder is built beside the destination and renamed
into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vit_jax.interop.deploy import common

NAME = "savedmodel"
SUFFIXES = ("",)  # a folder
RUNTIME = "tensorflow"
METADATA_FILE = "vit_jax.json"


def outputs(path: str) -> list[str]:
    return [os.path.join(os.fspath(path), "saved_model.pb")]


def unrepresentable(config, options: common.Options) -> list[str]:
    return [f"quantize={options.quantize!r} (tflite only)"] if options.quantize else []


def tf_function(fn, spec, tf, polymorphic: bool = True, named: bool = False):
    """`fn` as a tf.function of one `images` tensor (jax2tf, with_gradient=False); `named`:
    returning {'logits': ...}, as a signature does."""
    from jax.experimental import jax2tf

    shape, dtype = spec
    names = iter(("b", "h", "w"))
    poly = "(" + ", ".join(next(names) if d is None else str(d) for d in shape) + ")"
    converted = jax2tf.convert(
        fn, polymorphic_shapes=[poly] if polymorphic else None, with_gradient=False
    )
    signature = [tf.TensorSpec(shape, tf.as_dtype(dtype), name="images")]
    body = (lambda images: {"logits": converted(images)}) if named else converted
    return tf.function(body, input_signature=signature, autograph=False)


def export(fn, spec, path: str, meta: dict[str, Any], options: common.Options) -> None:
    tf = common.require("tensorflow", NAME)
    serve = tf_function(fn, spec, tf, named=True)
    text = json.dumps(meta, indent=1, sort_keys=True)

    def build(folder: str) -> None:
        module = tf.Module()
        module.serve = serve
        module.vit_jax_metadata = tf.constant(text)
        sidecar = os.path.join(folder, ".meta", METADATA_FILE)
        os.makedirs(os.path.dirname(sidecar))
        with open(sidecar, "w") as f:
            f.write(text)
        module.metadata_asset = tf.saved_model.Asset(sidecar)
        tf.saved_model.save(
            module, os.path.join(folder, "model"), signatures={"serving_default": serve}
        )
        # The SavedModel is the folder itself: move it up, drop the scaffolding.
        inner = os.path.join(folder, "model")
        for name in os.listdir(inner):
            os.replace(os.path.join(inner, name), os.path.join(folder, name))
        os.rmdir(inner)
        os.remove(sidecar)
        os.rmdir(os.path.dirname(sidecar))

    common.write_folder_whole(path, build, overwrite=True)  # the caller checked the destination


def load(path: str) -> common.Runner:
    tf = common.require("tensorflow", NAME, "run it")
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"{path!r} is not a SavedModel folder (no saved_model.pb)")
    loaded = tf.saved_model.load(os.fspath(path))
    meta_file = os.path.join(path, "assets", METADATA_FILE)
    with open(meta_file) as f:
        meta = json.load(f)
    serve = loaded.signatures["serving_default"]
    return common.Runner(lambda x: serve(images=tf.constant(x))["logits"].numpy(), meta)
