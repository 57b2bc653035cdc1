"""google-research/big_vision `models/vit.py` names → ours (big_vision files are `.npz`, read by vit_jax_npz).

big_vision differs from the published vit_jax layout in four ways, all handled here:
  * a `params/` prefix (big_vision checkpoints may hold optimizer state beside the params), and
    `img/` under it for the image tower of two-tower (image-text) models;
  * block sublayers numbered from 0 in each kind (`MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0`) instead of in creation order (`_1`, `LayerNorm_2`, `MlpBlock_3`);
  * position embeddings at the root (`pos_embedding`) and never covering the class token, or absent
    altogether for fixed sin-cos embeddings;
  * `scan=True` checkpoints stack the blocks as `Transformer/encoderblock/...` with a leading layer axis.
The MAP head (`MAPHead_0`), `cls`, `head` and `pre_logits` already carry our names.
"""

from __future__ import annotations

import re

import numpy as np

PREFIX = "params/"
IMAGE_TOWER = "img/"  # two-tower (image-text) checkpoints: the image encoder's parameters
ROOT_POSEMB = "pos_embedding"
_BLOCK_RENAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_SCANNED = re.compile(r"^Transformer/encoderblock/(.*)$")
_BLOCK_SUBLAYER = re.compile(r"^(Transformer/encoderblock_\d+/)([^/]+)(/.*)?$")


def unscan(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """`Transformer/encoderblock/X` (L, ...) → `Transformer/encoderblock_{i}/X`; and whether it was."""
    out, scanned = {}, False
    for key, value in flat.items():
        if match := _SCANNED.match(key):
            scanned = True
            for i, layer in enumerate(value):
                out[f"Transformer/encoderblock_{i}/{match[1]}"] = layer
        else:
            out[key] = value
    return out, scanned


def rename(key: str) -> str:
    """One big_vision key → ours (identity for keys that already match)."""
    if match := _BLOCK_SUBLAYER.match(key):
        return match[1] + _BLOCK_RENAMES.get(match[2], match[2]) + (match[3] or "")
    return key
