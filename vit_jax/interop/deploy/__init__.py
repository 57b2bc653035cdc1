"""Deployment: a model leaves JAX as a file that runs in another runtime, without this project.

    save_pretrained(params, "model.onnx", format="onnx", model=config, preprocessing=pre)
    runner = load("model.onnx"); logits = runner(images); runner.meta   # the input convention

  onnx        `onnx_format.py`  jax2onnx → ONNX (opset 18, dynamic batch), run by onnxruntime;
                                with preprocessing, ONNX ops resize uint8 images of any size
  savedmodel  `savedmodel.py`   jax2tf → TF SavedModel folder (serving_default, dynamic batch)
  tflite      `tflite.py`       jax2tf → LiteRT/TFLite (static batch; `quantize='dynamic_int8'`)
  stablehlo   `stablehlo.py`    jax.export → serialized StableHLO (+ JSON), run by jax alone
  common.py   the traced function, in-graph preprocessing, the description, whole writes

Each format module has the interface an inference-only format needs (`REGISTRY` loops over it):

  NAME, SUFFIXES                 the name (`--to`, `format=`) and the destination suffixes ('': a
                                 folder); `check_destination` refuses another format's suffix
  RUNTIME                        the module that runs the file (`load` names its package if absent)
  outputs(path)                  the files it writes (checked before anything is traced)
  unrepresentable(config, opts)  what it cannot express of the model or the options ([] if none)
  export(fn, spec, path, meta, opts)  writes the traced `fn` of input `spec`, carrying `meta`
  export_pixels(fn, spec, config,     optional: with_preprocessing for uint8 images of any size
    pre, path, meta, opts)       when no input_size is given, by the format's own ops (its
                                 resize) ahead of `fn`, the model alone (float `spec`)
  load(path) → common.Runner     the file in its runtime: runner(images) → logits, runner.meta

Every file carries its input convention in the format's own metadata (ONNX metadata_props, the
SavedModel's assets, a TFLite metadata buffer, the JSON beside a StableHLO blob). `with_preprocessing`
bakes polarity, channel order, resize and normalization in, so the file takes uint8 HWC pixels.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from vit_jax.interop import save
from vit_jax.interop.deploy import common, onnx_format, savedmodel, stablehlo, tflite
from vit_jax.interop.formats import REGISTRY as WEIGHT_FORMATS
from vit_jax.interop.input_convention import DEFAULT, Preprocessing
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer

REGISTRY = {m.NAME: m for m in (onnx_format, savedmodel, tflite, stablehlo)}
FORMATS = (*WEIGHT_FORMATS, *REGISTRY)  # everything `save_pretrained` writes


def _module(format: str):
    if format not in REGISTRY:
        raise ValueError(f"format={format!r}: allowed {sorted(FORMATS)}")
    return REGISTRY[format]


def _suffix(path: str) -> str:
    return "" if path.endswith("/") else os.path.splitext(os.path.basename(path))[1].lower()


def check_destination(path: str, format: str, overwrite: bool = False) -> None:
    """ValueError naming `path` if `format` (any of `FORMATS`) cannot be written there, before
    anything is read or written: another format's suffix, a file where a folder goes or the
    reverse, an existing destination unless `overwrite`."""
    path = os.fspath(path)
    if format not in REGISTRY:  # a weight format: also refuse a deployment format's suffix
        if format in WEIGHT_FORMATS and _suffix(path) in {
            s for m in REGISTRY.values() for s in m.SUFFIXES if s
        }:
            raise ValueError(f"{path}: format {format!r} does not write a {_suffix(path)} file")
        save.check_destination(path, format, overwrite)
        return
    module = _module(format)
    suffix = _suffix(path)
    theirs = {s for m in (*WEIGHT_FORMATS.values(), *REGISTRY.values()) for s in m.SUFFIXES}
    if suffix not in module.SUFFIXES and (suffix in theirs or "" not in module.SUFFIXES):
        wanted = "a folder" if module.SUFFIXES == ("",) else f"a {module.SUFFIXES[0]} file"
        shown = "a folder" if not suffix else f"a {suffix} file"
        raise ValueError(f"{path}: format {format!r} writes {wanted}, not {shown}")
    if "://" in path:
        raise ValueError(f"{path}: format {format!r} writes local files only")
    if module.SUFFIXES == ("",):  # a folder
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"{path} is a file; format {format!r} writes a folder there")
        if os.path.isdir(path) and os.listdir(path) and not overwrite:
            raise ValueError(
                f"{path} is a folder that is not empty; refusing to replace it "
                "(--overwrite, or overwrite=True in Python, allows it)"
            )
        return
    save.check_outputs(module.outputs(path), overwrite)


def check_representable(config: ViTConfig, pre: Preprocessing, format: str, options) -> None:
    """ValueError naming what of the model or options `format` cannot express."""
    problems = [
        f"{field}={getattr(config, field)!r} (deployed files are float32: --set {field}=float32)"
        for field in ("dtype", "param_dtype")
        if getattr(config, field) != "float32"
    ]
    if config.attention_impl == "cudnn":
        problems.append("attention_impl='cudnn' (a GPU kernel: --set attention_impl=auto)")
    problems += _module(format).unrepresentable(config, options)
    problems += common.preprocessing_problems(pre, options)
    if problems:
        raise ValueError(f"format {format!r} cannot express {'; '.join(problems)}")


def export(
    params: Any,
    config: ViTConfig,
    path: str,
    format: str,
    preprocessing: Preprocessing | None = None,
    labels: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
    with_preprocessing: bool = False,
    quantize: str | None = None,
    batch: int | None = None,
    input_size: Sequence[int] | None = None,
) -> str:
    """Trace `config`'s model with `params` as constants and write it as `format` to `path`."""
    module = _module(format)
    path = os.fspath(path)
    check_destination(path, format, overwrite)
    pre = preprocessing or DEFAULT
    size = None if input_size is None else tuple(int(s) for s in input_size)
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"input_size={input_size!r}: expected (height, width), both positive")
    if batch is not None and batch < 1:
        raise ValueError(f"batch={batch}: expected a positive batch size")
    if size is not None and not with_preprocessing:
        raise ValueError("input_size is the uint8 input's size: it needs with_preprocessing")
    own = with_preprocessing and size is None and hasattr(module, "export_pixels")
    options = common.Options(with_preprocessing, quantize, batch, size)
    if format == "tflite":
        options = tflite.with_static_batch(options)
    check_representable(config, pre, format, options)
    if labels is not None and len(labels) != config.num_classes:
        raise ValueError(f"{len(labels)} labels for a model of {config.num_classes} classes")
    fn, spec = common.forward(params, config, pre, options)
    meta = common.describe(config, pre, labels, options, format, spec)
    if own:  # the format's own ops resize any image size, ahead of the model alone
        plain = dataclasses.replace(options, with_preprocessing=False)
        fn, model_spec = common.forward(params, config, pre, plain)
        module.export_pixels(fn, model_spec, config, pre, path, meta, options)
    else:
        module.export(fn, spec, path, meta, options)
    return path


def save_pretrained(
    params: Any,
    path: str,
    format: str = "npz",
    model: VisionTransformer | ViTConfig | None = None,
    preprocessing: Preprocessing | None = None,
    *,
    overwrite: bool = False,
    **deploy_options,
) -> str:
    """`vit_jax.save_pretrained`: a weight format (`save.save_pretrained`) or a deployment format
    (`export`, with `with_preprocessing`, `quantize`, `batch`, `input_size`, `labels`)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed {sorted(FORMATS)}")
    if format not in REGISTRY:
        if deploy_options:
            raise ValueError(f"format {format!r} takes no {sorted(deploy_options)}")
        check_destination(path, format, overwrite)
        return save.save_pretrained(params, path, format, model, preprocessing, overwrite=overwrite)
    config = model.config if isinstance(model, VisionTransformer) else model
    if not isinstance(config, ViTConfig):
        raise ValueError("save_pretrained needs model= (a VisionTransformer or its ViTConfig)")
    if config.scan:
        from vit_jax.model.vit import unstack_layers

        params, config = unstack_layers(params), config.replace(scan=False)
    return export(
        params, config, path, format, preprocessing, overwrite=overwrite, **deploy_options
    )


def detect(path: str):
    """The deployment format module of an existing file or folder, else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return savedmodel if os.path.isfile(os.path.join(path, "saved_model.pb")) else None
    return next(
        (m for m in REGISTRY.values() if _suffix(path) in m.SUFFIXES and _suffix(path)), None
    )


def load(path: str) -> common.Runner:
    """A deployed file in its runtime (`common.Runner`)."""
    module = detect(path)
    if module is None:
        raise ValueError(f"{path}: not a deployed model ({', '.join(REGISTRY)})")
    return module.load(path)
