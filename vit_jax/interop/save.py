"""Checkpoints out: our params → a file another library loads (npz, timm, HF), refused up front when
the format or the destination cannot take them.

  save_pretrained(params, path, format='npz' | 'timm' | 'hf', model=model_or_config)  # overwrite=False
  check_destination(path, format, overwrite)   where `format` may be written; before anything is read
  check_representable(config, format)          what of `config` the format cannot hold
  reload_overrides(params, config, format)     what a reader of the tensors alone must be told

Every file written carries the full `ViTConfig` and the input convention beside the tensors, so
`load.load_checkpoint` reads it back exactly with no overrides; `reload_overrides` is for the other
libraries' readers, which see only the tensors (and the format's own config). Nothing is written
until the params are checked against the model, and each local file appears whole or not at all
(`integrity.write_whole`), so a refused or failed save leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vit_jax import integrity
from vit_jax.interop import fetch
from vit_jax.interop.formats import REGISTRY, layout
from vit_jax.interop.input_convention import DEFAULT, Preprocessing
from vit_jax.model import transfer
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer, unstack_layers


def _host_flat(params: Any, config: ViTConfig) -> dict[str, np.ndarray]:
    """Params of `config`'s model → flat loop-layout numpy, checked against the model first."""
    if config.scan:
        params = unstack_layers(params)
    flat = {k: np.asarray(v) for k, v in transfer.flatten(params).items()}
    transfer.check_fits(flat, transfer.expected_shapes(config.replace(scan=False)), what="params")
    return flat


def _write_bytes(data: bytes, path: str) -> None:
    if "://" in path:
        with fetch.gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    integrity.write_whole(path, data)  # never a half-written checkpoint under the real name


def _format(format: str):
    if format not in REGISTRY:
        raise ValueError(f"format={format!r}: allowed {sorted(REGISTRY)}")
    return REGISTRY[format]


def check_representable(config: ViTConfig, format: str) -> None:
    """ValueError naming everything of `config` that `format` cannot hold."""
    problems = _format(format).unrepresentable(config)
    if problems:
        raise ValueError(f"format {format!r} cannot represent {', '.join(problems)}")


_OVERWRITE_ALLOWS = "(--overwrite, or overwrite=True in Python, allows it)"


def _suffixes(module) -> str:
    shown = {"": "a folder (no suffix)"}
    return " or ".join(shown.get(s, f"a {s} file") for s in module.SUFFIXES)


def check_destination(path: str, format: str, overwrite: bool = False) -> None:
    """ValueError naming `path` if `format` cannot be written there, before anything is read or
    written: a suffix another format writes (`--to npz x.safetensors`), a file where a folder goes or
    the reverse, and, unless `overwrite`, an existing file or a folder that is not empty.
    """
    writer = _format(format)
    path = os.fspath(path)
    # '' (no suffix, or a trailing '/') names a folder.
    suffix = "" if path.endswith("/") else os.path.splitext(os.path.basename(path))[1].lower()
    theirs = {s for module in REGISTRY.values() for s in module.SUFFIXES} - set(writer.SUFFIXES)
    if suffix in theirs:  # unknown suffixes (model.bin) pass: only the content says the format
        shown = "a folder" if not suffix else f"a {suffix} file"
        raise ValueError(f"{path}: format {format!r} writes {_suffixes(writer)}, not {shown}")
    g = fetch.gfile() if "://" in path else None
    exists, isdir = (g.exists, g.isdir) if g else (os.path.lexists, os.path.isdir)
    outputs = writer.outputs(path)
    if path not in outputs:  # a folder of files
        if exists(path) and not isdir(path):
            raise ValueError(f"{path} is a file; format {format!r} writes a folder there")
        if isdir(path) and (g.listdir if g else os.listdir)(path) and not overwrite:
            raise ValueError(
                f"{path} is a folder that is not empty; refusing to add to it {_OVERWRITE_ALLOWS}"
            )
    elif isdir(path):
        raise ValueError(f"{path} is a folder; format {format!r} writes {_suffixes(writer)} there")
    if g is None:
        folder = path if path not in outputs else os.path.dirname(os.path.abspath(path))
        _check_local_place(path, folder)
    check_outputs(outputs, overwrite, exists, isdir)


def _check_local_place(destination: str, folder: str) -> None:
    """ValueError naming `destination` unless files can be written in `folder` (made if missing):
    its nearest existing ancestor must be a folder (not a file) that takes new files."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"{destination}: {existing} is a file, so nothing can be written under it; choose a "
            f"destination in a folder"
        )
    try:
        integrity.check_writable(existing)
    except OSError as e:
        cause = os.strerror(e.errno).lower() if e.errno else str(e)  # e.g. permission denied
        raise ValueError(
            f"{destination}: cannot write in {existing} ({cause}); choose a writable destination"
        ) from None


def check_outputs(outputs, overwrite: bool, exists=os.path.lexists, isdir=os.path.isdir) -> None:
    """ValueError naming the first of the files `outputs` that is a folder, or that exists unless
    `overwrite` (every writer checks this before anything is written)."""
    for out in outputs:
        if isdir(out):
            raise ValueError(f"{out} is a folder; refusing to replace it by a file")
        if exists(out) and not overwrite:
            raise ValueError(f"{out} already exists; refusing to overwrite it {_OVERWRITE_ALLOWS}")


def save_pretrained(
    params: Any,
    path: str,
    format: str = "npz",
    model: VisionTransformer | ViTConfig | None = None,
    preprocessing: Preprocessing | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write `params` of `model` as `format`; returns `path`.

    'npz': the published vit_jax layout, one file. 'timm': a safetensors state dict for
    `timm.create_model(...)` + `timm.models.load_checkpoint`, with timm's config.json (a folder when
    `path` has no suffix, else `<stem>.config.json` beside the file). 'hf': a folder with config.json,
    model.safetensors and preprocessor_config.json for `ViTForImageClassification.from_pretrained`
    (`ViTModel` when num_classes == 0). Every file carries the full config and `preprocessing`
    (default: [-1, 1] inputs), so `load_pretrained` reads it back exactly.

    An existing destination (a file, a non-empty folder) is refused unless `overwrite=True`, and so
    is a suffix of another format (`check_destination`); missing parent folders are created.
    """
    writer = _format(format)
    path = os.fspath(path)
    check_destination(path, format, overwrite)
    config = model.config if isinstance(model, VisionTransformer) else model
    if not isinstance(config, ViTConfig):
        raise ValueError("save_pretrained needs model= (a VisionTransformer or its ViTConfig)")
    check_representable(config, format)
    tensors = writer.from_ours(_host_flat(params, config), config)
    embedded = json.dumps(
        {"config": config.to_dict(), "preprocessing": (preprocessing or DEFAULT).to_dict()},
        sort_keys=True,
    )
    outputs = writer.files(path, tensors, config, embedded)
    for folder in {os.path.dirname(p) for p in outputs} - {""}:
        fetch.gfile().makedirs(folder) if "://" in folder else os.makedirs(folder, exist_ok=True)
    for out_path, data in outputs.items():
        _write_bytes(data, out_path)
    return path


def reload_overrides(params: Any, config: ViTConfig, format: str) -> dict[str, Any]:
    """What loading `format`'s tensors alone (as another library's file) must be told to rebuild
    exactly `config`. Our own files need none of it: they carry the config.

    Computed by translating the tensors that would be written back to our layout and inferring the
    config from them, as loading does, without touching the disk.
    """
    writer = _format(format)
    tensors = writer.from_ours(_host_flat(params, config), config)
    hints = writer.required_hints(config)
    converted = writer.to_ours(tensors, hints, writer.side_config(config))
    inferred = layout.canonical(layout.infer_config(converted, hints, converted.defaults))
    wanted = config.to_dict()
    differ = {k: v for k, v in wanted.items() if inferred.to_dict()[k] != v}
    return {**hints, **differ}
