"""Fit a parameter tree trained for one `ViTConfig` to another, as fine-tuning does.

`adapt_params(params, src, dst)` makes exactly these changes, and refuses everything else:
  * learned position embeddings are resampled (bilinear) to `dst`'s patch grid; class/register
    rows are kept as they are, because they have no place on the grid;
  * the head is re-initialized (zeros kernel, `dst.head_bias_init` bias) when the number of
    classes differs, and dropped when `dst.num_classes == 0`; a pre-logits layer is dropped when
    `dst` has none (the published "drop-head" fine-tuning recipe), and then the head is new too;
  * another patch size: the patch-embedding kernel is resampled by FlexiViT's PI-resize (`flexi.py`),
    for plain ViTs only (a hybrid's patches are cut from its ResNet feature map, not from pixels);
  * the layer stack is converted between the loop and scan layouts when `dst.scan` differs;
  * leaves are cast to `dst.param_dtype`.
Every other difference between the tree and what `dst` expects raises one `ValueError` naming the
first key that does not fit and both shapes, before anything is returned: never a half-adapted tree.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vit_jax.model import flexi, vit
from vit_jax.model.config import ViTConfig

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
HEAD_KEYS = ("head/kernel", "head/bias")


def flatten(params: Any) -> dict[str, Any]:
    """Nested params → {'Transformer/encoder_norm/scale': array, ...} (flax's order kept)."""
    return traverse_util.flatten_dict(dict(params), sep="/")


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


# Parameters in the order the forward pass meets them, so "the first key that does not fit" is the
# earliest one in the network (a wrong patch size shows up at `embedding/kernel`, not at `head`).
_TOP_ORDER = (
    "conv_root",  # a hybrid's ResNet stem (model/resnet.py) comes first
    "gn_root",
    *(f"block{i}" for i in range(1, 9)),
    "embedding",
    "cls",
    "dist",
    "registers",
    "Transformer",
    "MAPHead_0",
    "fc_norm",
    "pre_logits",
    "head",
    "head_dist",
)
_SEGMENT_RANK = {
    "posembed_input": -2,
    "probe": -1,
    "kernel": -1,
    "scale": -1,
    "query": 1,
    "key": 2,
    "value": 3,
    "query_norm": 4,
    "key_norm": 5,
    "out": 6,
    "encoder_norm": 1 << 30,
}


def _segment_order(segment: str) -> tuple:
    # Flax numbers submodules in creation order (LayerNorm_0, ..._1, LayerNorm_2, MlpBlock_3).
    match = re.fullmatch(r"(.*)_(\d+)", segment)
    if match:
        return (0, int(match[2]), match[1])
    return (_SEGMENT_RANK.get(segment, 0), 0, segment)


def forward_order(key: str) -> tuple:
    top, *rest = key.split("/")
    rank = _TOP_ORDER.index(top) if top in _TOP_ORDER else len(_TOP_ORDER)
    return (rank, *(_segment_order(s) for s in rest))


def expected_shapes(config: ViTConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter a model of `config` has, in forward order, computed without allocating."""
    flat = flatten(vit.param_shapes(vit.VisionTransformer(config)))
    return {key: flat[key] for key in sorted(flat, key=forward_order)}


class ParamMismatchError(ValueError):
    """A parameter tree does not fit a model; `key` is the first parameter that does not."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def check_fits(flat: dict[str, Any], expected: dict[str, Any], what: str = "checkpoint") -> None:
    """Raise ParamMismatchError at the first key whose presence or shape differs from `expected`."""
    for key, want in expected.items():
        if key not in flat:
            raise ParamMismatchError(
                f"{what} does not fit the model: parameter {key!r} (shape {tuple(want.shape)}) "
                f"is missing from the {what}",
                key,
            )
        got = tuple(np.shape(flat[key]))
        if got != tuple(want.shape):
            raise ParamMismatchError(
                f"{what} does not fit the model: {key!r} has shape {got} in the {what} but the "
                f"model expects {tuple(want.shape)}",
                key,
            )
    for key in flat:
        if key not in expected:
            raise ParamMismatchError(
                f"{what} does not fit the model: {key!r} (shape {tuple(np.shape(flat[key]))}) "
                f"in the {what} has no place in the model",
                key,
            )


def _posemb_prefix_rows(config: ViTConfig) -> int:
    return config.num_prefix_tokens if config.posemb_covers_prefix else 0


def resize_posemb(posemb: Any, src: ViTConfig, dst: ViTConfig) -> np.ndarray:
    """(1, prefix + src grid, D) → (1, prefix + dst grid, D).

    Prefix (class/register) rows are kept, patch rows resampled bilinearly; grids may be non-square.
    """
    src_prefix, dst_prefix = _posemb_prefix_rows(src), _posemb_prefix_rows(dst)
    src_rows = src_prefix + src.grid_size[0] * src.grid_size[1]
    if np.shape(posemb)[1] != src_rows:
        raise ParamMismatchError(
            f"{POSEMB_KEY!r} has shape {tuple(np.shape(posemb))} but the source config "
            f"(grid {src.grid_size}, {src_prefix} prefix rows) implies "
            f"{(1, src_rows, src.hidden_size)}",
            POSEMB_KEY,
        )
    if src_prefix != dst_prefix:
        dst_rows = dst_prefix + dst.grid_size[0] * dst.grid_size[1]
        raise ParamMismatchError(
            f"{POSEMB_KEY!r} has shape {tuple(np.shape(posemb))} with {src_prefix} class/register "
            f"rows, but the model expects {dst_prefix} of them, shape "
            f"{(1, dst_rows, dst.hidden_size)}",
            POSEMB_KEY,
        )
    prefix, patches = posemb[:, :src_prefix], posemb[:, src_prefix:]
    patches = vit.resize_posemb_grid(patches, src.grid_size, dst.grid_size)
    return np.concatenate([np.asarray(prefix), np.asarray(patches)], axis=1)


def _resizable(posemb: Any, src: ViTConfig, dst: ViTConfig) -> bool:
    """Whether only the grid differs; any other posemb mismatch is left to `check_fits` to report
    in forward order (a wrong width shows at `embedding/kernel` first)."""
    rows = _posemb_prefix_rows(src) + src.grid_size[0] * src.grid_size[1]
    return (
        src.grid_size != dst.grid_size
        and np.shape(posemb) == (1, rows, dst.hidden_size)
        and _posemb_prefix_rows(src) == _posemb_prefix_rows(dst)
    )


PATCH_KERNEL_KEY = "embedding/kernel"


def adapt_params(params: Any, src: ViTConfig, dst: ViTConfig, rng: Any = None) -> dict:
    """`params` of a `src` model → params of a `dst` model (what may differ: module docstring).

    `rng` is accepted for re-initialized parts that are random; today none is (the head starts at
    zero, as in the paper's fine-tuning), so it may be None.
    """
    del rng  # The only re-initialized layer, the head, has a deterministic init.
    if src.scan and not dst.scan:
        params = vit.unstack_layers(params)
    elif dst.scan and not src.scan:
        params = vit.stack_layers(params, src.num_layers)
    flat = dict(flatten(params))
    expected = expected_shapes(dst)

    # Another patch size: the kernel by FlexiViT's PI-resize (the posemb grid follows below). A
    # plain ViT takes any patch that divides the image (ViTConfig refuses the rest, naming both
    # sizes). A hybrid's patches are cells of the ResNet's feature map: PI-resize keeps a linear
    # map of *pixels* under resampling, which says nothing about feature-map cells.
    kernel = flat.get(PATCH_KERNEL_KEY)
    if src.patch_size != dst.patch_size and src.is_hybrid and dst.is_hybrid:
        raise ValueError(
            f"patch_size {src.patch_size} → {dst.patch_size} on a hybrid: its patches are cut from "
            f"the ResNet stem's feature map (stride {src.stem_stride}), which PI-resize does not "
            f"apply to; allowed: the checkpoint's patch_size {src.patch_size} (change image_size "
            f"instead: the position embeddings are resampled)"
        )
    if (
        src.patch_size != dst.patch_size
        and kernel is not None
        and kernel.shape[:2] == src.patch_size
        # only a kernel that fits the model but for its patch: any other mismatch is reported
        # below on the checkpoint's own shape
        and PATCH_KERNEL_KEY in expected
        and tuple(kernel.shape[2:]) == tuple(expected[PATCH_KERNEL_KEY].shape[2:])
    ):
        flat[PATCH_KERNEL_KEY] = flexi.pi_resize_kernel(np.asarray(kernel), dst.patch_size)

    if POSEMB_KEY in flat and POSEMB_KEY in expected and _resizable(flat[POSEMB_KEY], src, dst):
        flat[POSEMB_KEY] = resize_posemb(flat[POSEMB_KEY], src, dst)

    drop_pre_logits = dst.representation_size is None and src.representation_size is not None
    if drop_pre_logits:
        # Fine-tuning without pre-logits: the published recipe drops that layer ("drop head").
        for key in [k for k in flat if k.startswith("pre_logits/")]:
            del flat[key]

    # A new head for new classes, or for the new inputs left by dropping pre-logits.
    if src.num_classes != dst.num_classes or drop_pre_logits:
        for key in HEAD_KEYS:
            flat.pop(key, None)
            if key in expected:
                shape, dtype = expected[key].shape, expected[key].dtype
                init = 0.0 if key.endswith("kernel") else dst.head_bias_init
                flat[key] = np.full(shape, init, dtype)

    check_fits(flat, expected)
    # Cast to the model's param dtype (a bfloat16 checkpoint into a float32 model, or back).
    return unflatten(
        {
            key: value if value.dtype == expected[key].dtype else value.astype(expected[key].dtype)
            for key, value in flat.items()
        }
    )
