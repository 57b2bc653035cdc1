"""The published vit_jax `.npz` layout: flat `/`-joined keys of the (pre-linen) flax names.

Our parameter names are these names, so reading is mostly stripping prefixes: `opt/target/` (checkpoints
of the old flax optimizer) and big_vision's `params/` (its renames are in `big_vision.py`).

Writing ('npz') stores every parameter of every model option under our names (loop layout), which is
what timm's and big_vision's `.npz` loaders read for the options they know. A posemb that does not cover
the class/register tokens is stored at the root as `pos_embedding`, big_vision's name for exactly that.
Not stored (`convert.reload_overrides` says which to pass again): GELU flavour and LayerNorm epsilon
(read back as tanh GELU and 1e-6, the published values), sin-cos vs no posemb (read back as sin-cos),
the image size when there is no posemb parameter, mean pooling when a class token is also present,
and the scan layout.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from vit_jax.formats import big_vision, layout
from vit_jax.model_config import ViTConfig

OPTIMIZER_PREFIX = "opt/target/"
# What the published checkpoints were trained with; big_vision uses the same flax defaults.
SOURCE_DEFAULTS = ViTConfig(gelu_approximate=True, layernorm_epsilon=1e-6)


def read(path: str) -> dict[str, np.ndarray]:
    """Every array of an `.npz`, read now (so a truncated file fails here, not halfway through)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise ValueError(
            f"{path}: not a readable .npz checkpoint (truncated or corrupt?): {e}"
        ) from e


def _only_under(flat: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def _strip_prefix(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in (OPTIMIZER_PREFIX, big_vision.PREFIX):
        if any(key.startswith(prefix) for key in flat):
            # Only the model's parameters; optimizer state beside them is not ours to load.
            flat = _only_under(flat, prefix)
            break
    if "img/embedding/kernel" in flat:
        # A big_vision two-tower model (CLIP/SigLIP style): its image tower is a ViT.
        flat = _only_under(flat, big_vision.IMAGE_TOWER)
    return flat


def to_ours(flat: dict[str, np.ndarray]) -> layout.Converted:
    flat = _strip_prefix(flat)
    flat, scanned = big_vision.unscan(flat)
    params, origin = {}, {}
    covers_prefix = None
    for key, value in flat.items():
        ours = big_vision.rename(key)
        if key == big_vision.ROOT_POSEMB:
            ours, covers_prefix = layout.POSEMB, False  # big_vision: patch rows only
        params[ours] = value
        origin[ours] = key
    fields = {"scan": True} if scanned else {}
    return layout.Converted(
        params, fields=fields, origin=origin, posemb_covers_prefix=covers_prefix
    )


def check_representable(config: ViTConfig) -> None:
    del config  # Every option of our model has its parameters under our names.


def from_ours(flat: dict[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    out = dict(flat)
    if layout.POSEMB in out and not config.posemb_covers_prefix:
        out[big_vision.ROOT_POSEMB] = out.pop(layout.POSEMB)
    return out


def write(tensors: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()  # np.savez on a path would append '.npz' to names that lack it.
    np.savez(buffer, **tensors)
    return buffer.getvalue()
