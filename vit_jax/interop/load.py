"""Checkpoints in: every public ViT layout, and this project's own files, → (config, params).

  model, params = load_pretrained(path, variant=None, weights=None, **overrides)
  config, params = load_params(path, variant=None, **overrides)
  loaded = load_checkpoint(path, ...)   # .config, .params, .preprocessing, .weights

Weights of a training run (`weights`): a run with `config.ema_decay` > 0 keeps two sets, its
trained weights ('raw') and their exponential moving average ('ema'). The default (None) reads the
EMA when the checkpoint has one, else the raw weights: the EMA is the model such recipes report and
ship (timm's `--model-ema`, DeiT), training evaluates both (split 'eval_ema' of metrics.jsonl) and
it is the better one once the run has averaged over enough steps; `weights='raw'` reads the other.
Asking for 'ema' from a checkpoint without them, or from any other format (a file holds one set of
weights), is one ValueError naming the path.

Files this project writes (`save.save_pretrained`, training's Orbax checkpoints) also carry the full
`ViTConfig` and the input convention (`preprocessing`), so they load back exactly with no overrides;
`load_checkpoint` returns both.

The format is detected from the content, not the name: an `.npz` (published vit_jax, with or without
the `opt/target/` prefix, or big_vision), a safetensors file or torch pickle (timm state dict, or HF
weights beside a `config.json`), a folder (HF or timm hub folder with `config.json`, or this project's
Orbax checkpoints). Orbax checkpoints are read where they are (Orbax reads gs:// itself); anything else
remote is copied into the cache first (`fetch.localize`). Every hyperparameter the shapes determine is
read off them (`formats.layout`); the rest comes from `variant`/`overrides`, the HF config, or the
source's defaults. Overrides that the checkpoint cannot satisfy as it is — another `image_size`
(posemb resampled) or `num_classes` (new head) — go through `transfer.adapt_params`; anything else that
does not fit raises one ValueError naming the first parameter and both shapes, before any model is
returned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np

from vit_jax import trained
from vit_jax.interop import fetch
from vit_jax.interop import pretrained as pretrained_lib
from vit_jax.interop.formats import REGISTRY, layout, timm_config
from vit_jax.interop.formats.source import Source
from vit_jax.interop.input_convention import DEFAULT, Preprocessing
from vit_jax.model import transfer
from vit_jax.model.config import ViTConfig, parse_variant
from vit_jax.model.vit import VisionTransformer

log = logging.getLogger("vit_jax")


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
        named = timm_config.parse_timm_name(variant)
        if named is None:
            raise
        return named


@dataclasses.dataclass
class Loaded:
    """A checkpoint read back: the model's config, its params, and its input convention."""

    config: ViTConfig
    params: dict
    preprocessing: Preprocessing
    # Which weights of a training run were read: 'ema' or 'raw'; None for any other format.
    weights: str | None = None


# The remote file systems Orbax reads checkpoints from (through etils.epath, which knows these).
_ORBAX_REMOTE = ("gs://", "s3://", "az://", "hf://")


def _is_orbax(path: str) -> bool:
    """Whether `path` is a vit_jax training checkpoint (workdir, checkpoints dir or step dir).

    Only a folder can be one: a local one, or one on a file system Orbax reads (an http(s) URL or
    another scheme names a file to copy). The answer is asked, never inferred from an error: a
    remote file system that cannot be asked (no credentials, no backend) raises here, as it would
    when the checkpoint is read.
    """
    if "://" in path:
        return path.startswith(_ORBAX_REMOTE) and trained.is_checkpoint(path)
    return os.path.isdir(path) and trained.is_checkpoint(path)


def _orbax(path: str, weights: str | None) -> tuple[ViTConfig, dict, Preprocessing | None, str]:
    # The newest intact step: a damaged newer one is named in a warning and skipped.
    config, params, recorded, step_dir = trained.read_trained(path, weights=weights)
    pre = Preprocessing.from_dict(recorded) if recorded else None
    return config, params, pre, trained.chosen_weights(step_dir, weights)


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
        posemb = params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
        if config.posemb == "sincos2d" and hints.get("posemb") == "learn" and posemb is not None:
            # Asked for: the exported fixed table is kept, as a learned (trainable) one.
            rows = np.shape(posemb)[1]
            config = config.replace(
                posemb="learn", posemb_covers_prefix=rows > math.prod(config.grid_size)
            )
        else:
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
    weights: str | None = None,
    **overrides,
) -> Loaded:
    """Config, params and preprocessing of any supported checkpoint; see the module docstring.

    `pretrained` names a public checkpoint of the model `path` names (`vit_jax.list_pretrained()`),
    e.g. load_checkpoint('ViT-B/16', pretrained='augreg-i21k-ft-i1k'): downloaded once, then cached.
    `weights` ('ema' | 'raw' | None): which weights of a training run (module docstring).
    """
    trained.check_weights(weights)
    named_pre = None
    if pretrained is not None:
        entry = pretrained_lib.find(path, pretrained)
        path, named_pre = pretrained_lib.fetch(entry), entry.preprocessing
        variant = variant or pretrained_lib.variant_of(entry) or None
    hints = {**variant_fields(variant), **overrides}
    path = os.fspath(path)
    translated = not _is_orbax(path)
    chosen = None
    if not translated:  # ours: the config was saved beside the params
        source_config, params, pre, chosen = _orbax(path, weights)
        origin, preferred, exact = {}, {}, True
    else:
        if weights == "ema":  # before any download: only a training checkpoint keeps two sets
            raise ValueError(
                f"weights='ema': {path} is not a vit_jax training checkpoint (a workdir, its "
                f"checkpoints/ or one step), so it holds one set of weights and no EMA; allowed "
                f"for it: weights='raw' or None"
            )
        path = fetch.localize(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
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
    if pre is None:  # the convention the name says: the table's, else a timm name's (DeiT)
        pre = named_pre
    if pre is None and isinstance(variant, str):
        pre = timm_config.name_preprocessing(variant)
    if pre is None:
        pre = DEFAULT
        if not translated or Source(path).kind != "npz":  # published .npz: [-1, 1] by convention
            log.warning(
                "%s: guessed the input convention %s (the checkpoint does not record it)",
                path,
                DEFAULT.describe(),
            )
    return Loaded(config, jax.tree.map(np.asarray, params), pre, chosen)


def load_params(
    path: str, *, variant: str | ViTConfig | None = None, **overrides
) -> tuple[ViTConfig, dict]:
    """(config, params) of any supported checkpoint; see the module docstring."""
    loaded = load_checkpoint(path, variant=variant, **overrides)
    return loaded.config, loaded.params


def load_pretrained(
    path: str,
    *,
    variant: str | ViTConfig | None = None,
    pretrained: str | None = None,
    weights: str | None = None,
    **overrides,
) -> tuple[VisionTransformer, dict]:
    """(model, params) ready for `model.apply({'params': params}, images)`; see the module docstring.

    `load_pretrained('ViT-B/16', pretrained='augreg-i21k-ft-i1k')` fetches a public checkpoint by
    name (see `vit_jax.list_pretrained()`). `weights` picks a training run's weights: 'ema' (the
    exponential moving average), 'raw', or None (the default): the EMA when the run kept one (it is
    the model EMA recipes report and ship), else the raw weights; 'ema' from a checkpoint without
    them is one ValueError naming it.
    """
    loaded = load_checkpoint(
        path, variant=variant, pretrained=pretrained, weights=weights, **overrides
    )
    return VisionTransformer(loaded.config), loaded.params
