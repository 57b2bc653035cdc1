"""Checkpoints in and out: every public ViT layout → (model, params), and ours → npz / timm / HF.

  model, params = load_pretrained(path, variant=None, **overrides)
  config, params = load_params(path, variant=None, **overrides)
  save_pretrained(params, path, format='npz' | 'timm' | 'hf', model=model_or_config)  # overwrite=False
  loaded = load_checkpoint(path, ...)   # .config, .params, .preprocessing
  python -m vit_jax.convert SRC DST --to npz|timm|hf [--variant V] [--set key=value ...] [--overwrite]

Files this project writes also carry the full `ViTConfig` and the input convention (`preprocessing`),
so they load back exactly with no overrides; `load_checkpoint` returns both.

The format is detected from the content, not the name: an `.npz` (published vit_jax, with or without
the `opt/target/` prefix, or big_vision), a safetensors file or torch pickle (timm state dict, or HF
weights beside a `config.json`), a folder (HF or timm hub folder with `config.json`, or this project's
Orbax checkpoints). Every hyperparameter the shapes determine is read off them (`formats.layout`);
the rest comes from `variant`/`overrides`, the HF config, or the source's defaults. Overrides that the
checkpoint cannot satisfy as it is — another `image_size` (posemb resampled) or `num_classes` (new head)
— go through `transfer.adapt_params`; anything else that does not fit raises one ValueError naming the
first parameter and both shapes, before any model is returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import urllib.parse
import urllib.request
from typing import Any

import jax
import numpy as np

from vit_jax import checkpoints, integrity, progress, transfer

# The command line (`python -m vit_jax.convert`, `vit-convert`) is vit_jax.convert_cli's.
from vit_jax.convert_cli import main, set_flags  # noqa: F401
from vit_jax.formats import REGISTRY, layout, timm
from vit_jax.formats.source import Source
from vit_jax.model_config import ViTConfig, parse_variant
from vit_jax.models import VisionTransformer
from vit_jax.preprocessing import DEFAULT, Preprocessing

FORMATS = REGISTRY  # the formats we read and write, by name
CACHE_DIR = os.environ.get("VIT_JAX_CACHE", os.path.expanduser("~/.cache/vit_jax"))
log = logging.getLogger("vit_jax")


# ---------------------------------------------------------------------------------------------
# Where the bytes are: local paths, gs:// (tf.io.gfile) and http(s) (urllib), cached locally.


def _gfile():
    import tensorflow as tf  # Only for gs:// and other remote file systems.

    return tf.io.gfile


def _cache_path(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path.rstrip("/")) or "checkpoint"
    return os.path.join(CACHE_DIR, hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _is_orbax(path: str) -> bool:
    """A vit_jax training checkpoint (workdir, checkpoints dir or step dir), local or remote."""
    if path.startswith(("http://", "https://")) or ("://" not in path and not os.path.isdir(path)):
        return False
    try:
        return checkpoints.is_checkpoint(path)
    except Exception:  # Cannot probe it (a remote file, no backend for the file system): not
        return False  # ours; reading it as a file then reports what is wrong.


def localize(path: str) -> str:
    """A local path holding `path`'s content (downloaded once into CACHE_DIR when remote)."""
    path = os.fspath(path)
    if "://" not in path or _is_orbax(path):
        return path  # Orbax reads remote file systems itself.
    local = _cache_path(path)
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = local + ".partial"
    if path.startswith(("http://", "https://")):
        with urllib.request.urlopen(path) as response, open(partial, "wb") as f:
            progress.copy(
                response,
                f,
                getattr(response, "length", None),
                f"download {os.path.basename(local)}",
            )
    elif _gfile().isdir(path):  # An HF folder: its files, not recursively.
        os.makedirs(partial, exist_ok=True)
        for name in _gfile().listdir(path):
            if not _gfile().isdir(f"{path}/{name}"):
                _gfile().copy(f"{path}/{name}", os.path.join(partial, name), overwrite=True)
    else:
        _gfile().copy(path, partial, overwrite=True)
    os.replace(partial, local)
    return local


# ---------------------------------------------------------------------------------------------
# Reading: the first registered format that recognizes the content translates it to our layout.


def detect_format(source: Source):
    """The `formats.REGISTRY` module that reads `source`; ValueError naming what it looks like."""
    for module in REGISTRY.values():
        if module.detect(source):
            return module
    if source.is_dir:
        raise ValueError(
            f"{os.path.join(source.path, 'config.json')}: neither an HF ViT config nor a timm one"
        )
    first = next(iter(source.keys), None)
    raise ValueError(f"{source.path}: a state dict of no known ViT layout (first key {first!r})")


def variant_fields(variant: str | ViTConfig | None) -> dict[str, Any]:
    """'ViT-B/16', a timm name ('vit_base_patch16_224') or a ViTConfig → the config fields it fixes."""
    if variant is None:
        return {}
    if isinstance(variant, ViTConfig):
        return variant.to_dict()
    try:
        return parse_variant(variant)
    except ValueError:
        named = timm.parse_timm_name(variant)
        if named is None:
            raise
        return named


@dataclasses.dataclass
class Loaded:
    """A checkpoint read back: the model's config, its params, and its input convention."""

    config: ViTConfig
    params: dict
    preprocessing: Preprocessing


def _orbax(path: str) -> tuple[ViTConfig, dict, Preprocessing | None]:
    config, params = checkpoints.read_model(path)
    recorded = checkpoints.read_preprocessing(path)
    return config, params, Preprocessing.from_dict(recorded) if recorded else None


def _translated(path: str, hints: dict[str, Any]):
    """A foreign (or our exported) file → (config of its params, params, preprocessing, origin,
    preferred settings, whether the config is exactly the file's own)."""
    source = Source(path)
    described = source.embedded
    # Our own files say what their tensors cannot (e.g. timm's heads); the caller may still override.
    read_hints = {**described["config"], **hints} if described else hints
    converted = detect_format(source).read(source, read_hints)
    params = transfer.unflatten(converted.params)
    if described:  # ours: the exact config and convention, nothing to infer or guess
        config = ViTConfig.from_dict(described["config"])
        pre = Preprocessing.from_dict(described["preprocessing"])
        params = layout.drop_fixed_posemb(params, config)
        return (
            config.replace(scan=False),
            params,
            pre,
            converted.origin,
            {"scan": config.scan},
            True,
        )
    config = layout.infer_config(converted, hints, converted.defaults)
    for guess in converted.guessed:
        log.warning("%s: guessed %s", path, guess)
    preferred = {"scan": True} if converted.fields.get("scan") else {}  # keep big_vision's scan
    return config, params, converted.preprocessing, converted.origin, preferred, False


def load_checkpoint(
    path: str,
    *,
    variant: str | ViTConfig | None = None,
    pretrained: str | None = None,
    **overrides,
) -> Loaded:
    """Config, params and preprocessing of any supported checkpoint; see the module docstring.

    `pretrained` names a public checkpoint of the model `path` names (`vit_jax.list_pretrained()`),
    e.g. load_checkpoint('ViT-B/16', pretrained='augreg-i21k-ft-i1k'): downloaded once, then cached.
    """
    named_pre = None
    if pretrained is not None:
        from vit_jax import pretrained as pretrained_lib

        entry = pretrained_lib.find(path, pretrained)
        path, named_pre = pretrained_lib.fetch(entry), entry.preprocessing
        variant = variant or pretrained_lib.variant_of(entry) or None
    hints = {**variant_fields(variant), **overrides}
    path = localize(path)
    translated = not _is_orbax(path)
    if not translated:  # ours: the config was saved beside the params
        source_config, params, pre = _orbax(path)
        origin, preferred, exact = {}, {}, True
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    else:
        source_config, params, pre, origin, preferred, exact = _translated(path, hints)
    config = source_config.replace(**{**preferred, **hints})
    if translated and not exact:
        config = layout.canonical(config)
    if config.posemb == "sincos2d" and source_config.posemb == "learn":
        # A sin-cos model exported to a library without sin-cos: its table is fixed, not learned.
        params = layout.drop_fixed_posemb(params, config)
        source_config = source_config.replace(
            posemb="sincos2d", posemb_covers_prefix=config.posemb_covers_prefix
        )
    try:
        params = transfer.adapt_params(params, source_config, config)
    except transfer.ParamMismatchError as e:
        if e.key in origin and origin[e.key] != e.key:
            raise transfer.ParamMismatchError(
                f"{path}: {e} ({e.key!r} is {origin[e.key]!r} in the file)", e.key
            ) from None
        raise transfer.ParamMismatchError(f"{path}: {e}", e.key) from None
    if pre is None:
        pre = named_pre or (timm.name_preprocessing(variant) if isinstance(variant, str) else None)
    if pre is None:
        pre = DEFAULT
        if not translated or Source(path).kind != "npz":  # published .npz: [-1, 1] by convention
            log.warning(
                "%s: guessed the input convention %s (the checkpoint does not record it)",
                path,
                DEFAULT.describe(),
            )
    return Loaded(config, jax.tree.map(np.asarray, params), pre)


def load_params(
    path: str, *, variant: str | ViTConfig | None = None, **overrides
) -> tuple[ViTConfig, dict]:
    """(config, params) of any supported checkpoint; see the module docstring."""
    loaded = load_checkpoint(path, variant=variant, **overrides)
    return loaded.config, loaded.params


def load_pretrained(
    path: str, *, variant: str | ViTConfig | None = None, pretrained: str | None = None, **overrides
) -> tuple[VisionTransformer, dict]:
    """(model, params) ready for `model.apply({'params': params}, images)`; see the module docstring.

    `load_pretrained('ViT-B/16', pretrained='augreg-i21k-ft-i1k')` fetches a public checkpoint by
    name (see `vit_jax.list_pretrained()`).
    """
    loaded = load_checkpoint(path, variant=variant, pretrained=pretrained, **overrides)
    return VisionTransformer(loaded.config), loaded.params


# ---------------------------------------------------------------------------------------------
# Writing.


def _host_flat(params: Any, config: ViTConfig) -> dict[str, np.ndarray]:
    """Params of `config`'s model → flat loop-layout numpy, checked against the model first."""
    if config.scan:
        from vit_jax.models import unstack_layers

        params = unstack_layers(params)
    flat = {k: np.asarray(v) for k, v in transfer.flatten(params).items()}
    transfer.check_fits(flat, transfer.expected_shapes(config.replace(scan=False)), what="params")
    return flat


def _write_bytes(data: bytes, path: str) -> None:
    if "://" in path:
        with _gfile().GFile(path, "wb") as f:
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
    g = _gfile() if "://" in path else None
    exists, isdir = (g.exists, g.isdir) if g else (os.path.lexists, os.path.isdir)
    again = "(--overwrite, or overwrite=True in Python, allows it)"
    outputs = writer.outputs(path)
    if path not in outputs:  # a folder of files
        if exists(path) and not isdir(path):
            raise ValueError(f"{path} is a file; format {format!r} writes a folder there")
        if isdir(path) and (g.listdir if g else os.listdir)(path) and not overwrite:
            raise ValueError(f"{path} is a folder that is not empty; refusing to add to it {again}")
    elif isdir(path):
        raise ValueError(f"{path} is a folder; format {format!r} writes {_suffixes(writer)} there")
    for out in outputs:
        if isdir(out):
            raise ValueError(f"{out} is a folder; refusing to replace it by a file")
        if exists(out) and not overwrite:
            raise ValueError(f"{out} already exists; refusing to overwrite it {again}")


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
        _gfile().makedirs(folder) if "://" in folder else os.makedirs(folder, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
