"""Our flat parameter layout: the common ground of every checkpoint translation.

A foreign checkpoint is first renamed and reshaped into our layout (flat `/`-joined keys, loop layout,
numpy arrays), then `infer_config` reads every hyperparameter the shapes determine. What the shapes do
not determine comes from the source (`Converted.fields`: an HF config, a scanned file) or from the
caller's `hints` (variant and overrides).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit_jax.model.config import ViTConfig, stem_stride_of

POSEMB = "Transformer/posembed_input/pos_embedding"
BLOCK = "Transformer/encoderblock_{}"
ATTN = BLOCK + "/MultiHeadDotProductAttention_1"
MLP = BLOCK + "/MlpBlock_3"
# A LayerScale value only matters when initializing; a loaded model needs some non-None value.
LOADED_LAYERSCALE_INIT = 1e-5
DEFAULT_IMAGE_SIZE = 224
_BLOCK_RE = re.compile(r"Transformer/encoderblock_(\d+)/")
ROOT_CONV = "conv_root/kernel"  # a hybrid's ResNet root (model/resnet.py names)
_UNIT_RE = re.compile(r"block(\d+)/unit(\d+)/")
_UNIT_LAYERS = (
    "conv1/kernel",
    "conv2/kernel",
    "conv3/kernel",
    "gn1/scale",
    "gn2/scale",
    "gn3/scale",
)


@dataclasses.dataclass
class Converted:
    """A checkpoint translated into our layout, with what the source says beyond the shapes."""

    params: dict[str, np.ndarray]  # flat, '/'-joined, loop layout (encoderblock_{i})
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. HF config values
    origin: dict[str, str] = dataclasses.field(default_factory=dict)  # our key → the source's key
    posemb_covers_prefix: bool | None = None  # None: decide from the position embedding's rows
    posemb_without_param: str = "sincos2d"  # what a checkpoint without posemb parameter means
    defaults: ViTConfig | None = None  # the source library's defaults for what files do not say
    preprocessing: Any = (
        None  # `vit_jax.interop.input_convention.Preprocessing` when the source says
    )
    guessed: list[str] = dataclasses.field(default_factory=list)  # settings nobody gave: warned

    def source_key(self, key: str) -> str:
        return self.origin.get(key, key)


def block_count(flat: dict[str, Any]) -> int:
    indices = {int(m[1]) for key in flat if (m := _BLOCK_RE.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"encoder blocks {sorted(indices)} are not numbered 0..{len(indices) - 1}")
    return len(indices)


def resnet_fields(conv: Converted) -> dict[str, Any]:
    """A hybrid's stem fields from its ResNet keys ({} for a plain ViT); a stage or unit missing
    from the numbering, or a unit missing a layer, is a ValueError naming it."""
    flat = conv.params
    units: dict[int, set[int]] = {}
    for key in flat:
        if m := _UNIT_RE.match(key):
            units.setdefault(int(m[1]), set()).add(int(m[2]))
    if ROOT_CONV not in flat:
        if units:
            raise ValueError(
                f"hybrid checkpoint without its ResNet root: no {conv.source_key(ROOT_CONV)!r} "
                f"beside {conv.source_key(sorted(k for k in flat if _UNIT_RE.match(k))[0])!r}"
            )
        return {}
    if sorted(units) != list(range(1, len(units) + 1)):
        missing = sorted(set(range(1, max(units) + 1)) - set(units))
        raise ValueError(
            f"hybrid checkpoint: ResNet stages {sorted(units)} are not numbered 1..{len(units)} "
            f"(stage(s) {missing} missing, e.g. 'block{missing[0]}/unit1/conv1/kernel'); allowed: "
            f"every stage block1..blockN present"
        )
    for stage, found in sorted(units.items()):
        if sorted(found) != list(range(1, len(found) + 1)):
            raise ValueError(
                f"hybrid checkpoint: stage block{stage} has units {sorted(found)}, not numbered "
                f"1..{len(found)}"
            )
        for unit in sorted(found):
            needed = list(_UNIT_LAYERS) + (["conv_proj/kernel"] if unit == 1 else [])
            for layer in needed:
                key = f"block{stage}/unit{unit}/{layer}"
                if key not in flat:
                    raise ValueError(f"hybrid checkpoint: {conv.source_key(key)!r} is missing")
    root = flat[ROOT_CONV]
    return dict(
        resnet_stages=tuple(len(units[s]) for s in sorted(units)),
        resnet_width=int(root.shape[-1]),
        num_channels=int(root.shape[2]),
    )


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def default_image_size(patch: tuple[int, int]) -> tuple[int, int]:
    """224 px (the published resolution), rounded down to a multiple of the patch size."""
    return tuple(max(p, DEFAULT_IMAGE_SIZE // p * p) for p in patch)


def _posemb_grid(
    conv: Converted, rows: int, prefix: int, patch: tuple[int, int], image_hints: list[Any]
) -> tuple[tuple[int, int], bool]:
    """The patch grid and whether the posemb covers the prefix tokens, from the posemb's row count.

    An image size hint whose grid accounts for the rows wins (that is how non-square grids are read);
    otherwise the grid is taken to be square, covering the prefix tokens if that makes it square
    (timm's and vit_jax's default) and not covering them otherwise (timm `no_embed_class`).
    """
    covers_options = [True, False]
    if conv.posemb_covers_prefix is not None:
        covers_options = [conv.posemb_covers_prefix]
    if not prefix:
        covers_options = [covers_options[0]]
    for hint in image_hints:
        if hint is None:
            continue
        hint = _pair(hint)
        if all(h % p == 0 for h, p in zip(hint, patch)):
            grid = (hint[0] // patch[0], hint[1] // patch[1])
            for covers in covers_options:
                if rows - prefix * covers == grid[0] * grid[1]:
                    return grid, covers
    for covers in covers_options:
        side = math.isqrt(max(rows - prefix * covers, 0))
        if side and side * side == rows - prefix * covers:
            return (side, side), covers
    raise ValueError(
        f"{conv.source_key(POSEMB)!r} has {rows} rows, which with {prefix} class/register tokens "
        f"is not a square patch grid; pass image_size=(height, width) of the checkpoint"
    )


def _require(conv: Converted, key: str) -> np.ndarray:
    if key not in conv.params:
        raise ValueError(
            f"not a Vision Transformer checkpoint: no {conv.source_key(key)!r} "
            f"(found e.g. {sorted(conv.params)[:3]})"
        )
    return conv.params[key]


def infer_config(conv: Converted, hints: dict[str, Any], base: ViTConfig) -> ViTConfig:
    """The config that describes `conv.params` exactly.

    Precedence, lowest first: `base` (the source's defaults), `hints` that the shapes do not decide,
    `conv.fields` (what the file says), then everything the shapes determine.
    """
    flat = conv.params
    ph, pw, channels, width = _require(conv, "embedding/kernel").shape
    stem = resnet_fields(conv)
    depth = block_count(flat)
    if not depth:
        _require(conv, BLOCK.format(0) + "/LayerNorm_0/scale")
    query = _require(conv, ATTN.format(0) + "/query/kernel")
    has = lambda key: key in flat  # noqa: E731
    width_of = lambda key: flat[key].shape[1] if key in flat else None  # noqa: E731
    has_cls = has("cls")
    has_dist = has("dist")  # DeiT's distillation token
    registers = width_of("registers") or 0
    shaped: dict[str, Any] = dict(
        patch_size=(ph, pw),
        num_channels=stem.get("num_channels", channels),
        resnet_stages=stem.get("resnet_stages"),
        resnet_width=stem.get("resnet_width", base.resnet_width),
        hidden_size=width,
        num_layers=depth,
        num_heads=query.shape[1],
        mlp_dim=_require(conv, MLP.format(0) + "/Dense_0/kernel").shape[1],
        qkv_bias=has(ATTN.format(0) + "/query/bias"),
        qk_norm=has(ATTN.format(0) + "/query_norm/scale"),
        class_token=has_cls,
        num_registers=registers,
        distillation_token=has_dist,
        fc_norm=has("fc_norm/scale"),
        representation_size=width_of("pre_logits/kernel"),
        num_classes=width_of("head/kernel") or 0,
        scan=False,  # translations produce the loop layout; the caller may ask for scan after.
    )
    if not stem:  # no stem, no stem numerics: the defaults, whatever the source library uses
        shaped.update(
            resnet_norm_epsilon=ViTConfig.resnet_norm_epsilon,
            resnet_ws_epsilon=ViTConfig.resnet_ws_epsilon,
        )
    if has(BLOCK.format(0) + "/layerscale_attn"):
        shaped["layerscale_init"] = hints.get("layerscale_init") or LOADED_LAYERSCALE_INIT
    else:
        shaped["layerscale_init"] = None
    # Pooling: a MAP head is visible; fc_norm means timm's average pooling; else the class token.
    if has("MAPHead_0/probe"):
        shaped["pool"] = "map"
    elif shaped["fc_norm"] or not has_cls:
        shaped["pool"] = "gap"
    else:
        shaped["pool"] = "token"
    if "pool" in conv.fields or ("pool" in hints and shaped["pool"] != "map"):
        shaped.pop("pool")  # the source or the caller says (e.g. timm global_pool='avg' + norm).

    prefix = int(has_cls) + int(has_dist) + registers
    stride = stem_stride_of(stem.get("resnet_stages"))
    ph, pw = ph * stride, pw * stride  # image pixels per token (a hybrid's stem strides too)
    # The caller's image size may be the checkpoint's (naming a non-square grid) or a new one.
    image_hints = [hints.get("image_size"), conv.fields.get("image_size")]
    if has(POSEMB):
        grid, covers = _posemb_grid(conv, flat[POSEMB].shape[1], prefix, (ph, pw), image_hints)
        shaped.update(
            posemb="learn",
            posemb_covers_prefix=covers,
            image_size=(grid[0] * ph, grid[1] * pw),
        )
    else:
        posemb = hints.get("posemb", conv.fields.get("posemb", conv.posemb_without_param))
        given = [hint for hint in image_hints if hint is not None]
        image_size = given[0] if given else default_image_size((ph, pw))
        if not given:
            conv.guessed.append(
                f"image_size={list(image_size)} (no position embedding parameter tells the "
                f"resolution; the published default)"
            )
        # Without a posemb parameter the image size is free; keep the caller's, if any.
        shaped.update(posemb=posemb, posemb_covers_prefix=not prefix, image_size=image_size)
        if posemb == "learn":
            shaped["posemb"] = conv.posemb_without_param  # the mismatch is reported by the check

    unshaped_hints = {k: v for k, v in hints.items() if k not in shaped}
    fields = {k: v for k, v in conv.fields.items() if k not in shaped}
    return base.replace(**{**unshaped_hints, **fields, **shaped})


def canonical(config: ViTConfig) -> ViTConfig:
    """`class_token=None` where the pooling implies it, as a config written by hand would say.

    `infer_config` states the class token explicitly, so that an override of `pool` keeps it.
    """
    if config.class_token is not None and config.class_token == (config.pool == "token"):
        return config.replace(class_token=None)
    return config


def sincos_table(config: ViTConfig) -> np.ndarray:
    """The fixed sin-cos position embeddings of `config` as a (1, patches, width) float32 table."""
    from vit_jax.model.vit import posemb_sincos_2d

    return np.asarray(posemb_sincos_2d(config.grid_size, config.hidden_size), np.float32)


def with_learned_posemb(
    flat: dict[str, np.ndarray], config: ViTConfig, prefix_rows: bool
) -> dict[str, np.ndarray]:
    """Writing for libraries without sin-cos: the fixed table as a learned posemb parameter.

    `prefix_rows` adds zero rows for the class/register tokens (HF adds the posemb to the class
    token too; a zero row leaves it as it is), so the forward pass is unchanged.
    """
    if config.posemb != "sincos2d":
        return flat
    table = sincos_table(config)
    if prefix_rows and config.num_prefix_tokens:
        zeros = np.zeros((1, config.num_prefix_tokens, config.hidden_size), np.float32)
        table = np.concatenate([zeros, table], axis=1)
    return {**flat, POSEMB: table}


def _is_float(array: np.ndarray) -> bool:
    return jnp.issubdtype(array.dtype, jnp.floating)


def drop_fixed_posemb(params: dict[str, Any], config: ViTConfig) -> dict[str, Any]:
    """Reading back `with_learned_posemb`: the table goes when `config` says sin-cos and it matches.

    `params` is the nested tree; a table that is not the fixed one raises (it was trained).
    """
    inputs = params.get("Transformer", {}).get("posembed_input")
    if config.posemb != "sincos2d" or not inputs:
        return params
    stored = np.asarray(inputs["pos_embedding"])
    table = stored.astype(np.float32)
    expected = sincos_table(config)
    prefix = table.shape[1] - expected.shape[1]
    # The table's values lie in [-1, 1]: stored as float16 / bfloat16 each is off by up to half
    # that dtype's epsilon, so the tolerance is the dtype's epsilon (1e-5 for float32).
    tolerance = max(1e-5, float(jnp.finfo(stored.dtype).eps)) if _is_float(stored) else 1e-5
    if (
        prefix < 0
        or table.shape[2] != expected.shape[2]
        or np.abs(table[:, :prefix]).max(initial=0.0) > 0
        or np.abs(table[:, prefix:] - expected).max() > tolerance
    ):
        raise ValueError(
            f"posemb='sincos2d' was asked for, but {POSEMB!r} {table.shape} is not the fixed "
            f"sin-cos table of a {config.grid_size} grid (a learned one?); load it with posemb='learn'"
        )
    transformer = {k: v for k, v in params["Transformer"].items() if k != "posembed_input"}
    return {**params, "Transformer": transformer}
