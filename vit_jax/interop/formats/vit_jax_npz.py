"""The published vit_jax `.npz` layout: flat `/`-joined keys of the (pre-linen) flax names.

Our parameter names are these names, so reading is mostly stripping prefixes: `opt/target/` (checkpoints
of the old flax optimizer) and big_vision's `params/` (its renames are in `big_vision.py`).

Writing ('npz') stores every parameter of every model option under our names (loop layout), which is
what timm's and big_vision's `.npz` loaders read for the options they know. A posemb that does not cover
the class/register tokens is stored at the root as `pos_embedding`, big_vision's name for exactly that.
Not in the tensors (`save.reload_overrides` lists them): GELU flavour and LayerNorm epsilon (read
back as tanh GELU and 1e-6, the published values), a hybrid stem's epsilons (read back as the
original code's 1e-5 and 1e-6; the stem's stages and width are in its `block{n}/unit{m}` names), sin-cos vs no posemb (read back as sin-cos), the
image size when there is no posemb parameter, mean pooling when a class token is also present, and the
scan layout. Files we write carry all of these anyway: the full `ViTConfig` and the preprocessing are
JSON in the zip archive's comment, which numpy, timm and big_vision ignore.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np

from vit_jax.interop.formats import big_vision, layout
from vit_jax.interop.formats.source import Source
from vit_jax.model.config import ViTConfig

NAME = "npz"
SUFFIXES = (".npz",)  # one file
OPTIMIZER_PREFIX = "opt/target/"
# What the published checkpoints were trained with; big_vision uses the same flax defaults.
SOURCE_DEFAULTS = ViTConfig(gelu_approximate=True, layernorm_epsilon=1e-6)


def detect(source: Source) -> bool:
    return source.kind == "npz"


def read(source: Source, hints: dict[str, Any]) -> layout.Converted:
    """Every array of the file in our layout; the published convention is [-1, 1] inputs."""
    return to_ours(source.tensors, hints)


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


def to_ours(
    flat: dict[str, np.ndarray], hints: dict[str, Any] | None = None, side: Any = None
) -> layout.Converted:
    del hints, side  # the names say everything the shapes do not leave open
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
        params,
        fields=fields,
        origin=origin,
        posemb_covers_prefix=covers_prefix,
        defaults=SOURCE_DEFAULTS,
    )


def unrepresentable(config: ViTConfig) -> list[str]:
    del config  # Every option of our model has its parameters under our names.
    return []


def side_config(config: ViTConfig) -> None:
    del config  # an .npz is self-contained


def required_hints(config: ViTConfig) -> dict[str, Any]:
    del config
    return {}


def from_ours(flat: dict[str, Any], config: ViTConfig) -> dict[str, np.ndarray]:
    # numpy has no bfloat16 of its own, so an .npz could not say what the bytes are.
    out = {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in flat.items()}
    if layout.POSEMB in out and not config.posemb_covers_prefix:
        out[big_vision.ROOT_POSEMB] = out.pop(layout.POSEMB)
    return out


def outputs(path: str) -> list[str]:
    return [path]


def files(
    path: str, tensors: dict[str, np.ndarray], config: ViTConfig, embedded: str
) -> dict[str, bytes]:
    """One .npz at `path`; our description of the model is the zip archive's comment."""
    del config
    buffer = io.BytesIO()  # np.savez on a path would append '.npz' to names that lack it.
    np.savez(buffer, **tensors)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = embedded.encode()
    return {path: buffer.getvalue()}


def how_to_load(path: str, config: ViTConfig) -> str:
    del config
    return f"vit_jax.load_pretrained({path!r}) (or numpy.load; big_vision and timm read it too)"
