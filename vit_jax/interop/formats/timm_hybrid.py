"""timm's hybrid backbones ⇄ our ResNet stem (`model/resnet.py`), for `formats/timm.py`.

timm builds the paper's hybrids (`vit_*_r*_s*`, `vision_transformer_hybrid.py`) as
`HybridEmbed(backbone)` with `backbone` a `ResNetV2(preact=False, stem_type='same')`, or for the
root alone (`vit_tiny_r_s16_p8_*`) the bare stem `create_resnetv2_stem(...)`:

  patch_embed.backbone.stem.conv / .norm                    ↔  conv_root, gn_root
  (root alone: patch_embed.backbone.conv / .norm)
  patch_embed.backbone.stages.{i}.blocks.{j}.conv{k} / norm{k} ↔  block{i+1}/unit{j+1}/conv{k} / gn{k}
  patch_embed.backbone.stages.{i}.blocks.{j}.downsample.conv / .norm ↔ .../conv_proj / gn_proj

Convs are OIHW there, HWIO here; GroupNorm weight/bias are our scale/bias. Other backbones (timm's
`resnet26d`/`resnet50d` hybrids, a pre-activation ResNetV2) have layers our stem does not, so they
are refused by name. timm's numerics: GroupNorm eps 1e-5, `StdConv2dSame` eps 1e-8 (`SOURCE_DEFAULTS`
of `timm.py` carries both).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from vit_jax.model.config import ViTConfig

BACKBONE = "patch_embed.backbone."
_UNIT_RE = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
_LAYERS = (("conv1", "norm1"), ("conv2", "norm2"), ("conv3", "norm3"))
# Registered timm names whose backbone (fixed by the name) is ours with `resnet_width` 64; their
# `model_args` set the Transformer. Facts from timm 1.0.31 `vision_transformer_hybrid.py`.
ARCHITECTURES = {
    (): "vit_tiny_r_s16_p8_224",
    (2, 2, 2): "vit_small_r20_s16_224",
    (2, 2, 2, 2): "vit_small_r26_s32_224",
    (3, 4, 9): "vit_base_r50_s16_224",
    (3, 4, 6, 3): "vit_large_r50_s32_224",
}
_NAME_STAGES = {"r": (), "r20": (2, 2, 2), "r26": (2, 2, 2, 2)}


def has_backbone(state: dict[str, Any]) -> bool:
    return any(key.startswith(BACKBONE) for key in state)


def _root(state: dict[str, Any]) -> str:
    """The backbone's root prefix, or a ValueError naming a backbone that is not a ResNetV2."""
    if BACKBONE + "stem.conv.weight" in state:
        if BACKBONE + "norm.weight" in state:  # only a pre-activation ResNetV2 has a final norm
            raise ValueError(
                f"timm hybrid backbone {BACKBONE + 'norm.weight'!r}: a pre-activation ResNetV2; "
                f"allowed: ResNetV2(preact=False), as timm's vit_*_r*_s* hybrids build it"
            )
        return BACKBONE + "stem."
    if BACKBONE + "conv.weight" in state:
        return BACKBONE
    first = sorted(key for key in state if key.startswith(BACKBONE))[0]
    raise ValueError(
        f"timm hybrid backbone {first!r}: not a ResNetV2; allowed: timm's ResNetV2(preact=False) "
        f"or its stem alone, as the vit_*_r*_s* hybrids build them ('{BACKBONE}stem.conv.weight' "
        f"or '{BACKBONE}conv.weight')"
    )


def _conv_in(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))  # OIHW → HWIO


def to_ours(
    state: dict[str, Any],
    get: Callable[[str], np.ndarray],
    put: Callable[[str, np.ndarray, str], None],
) -> None:
    """Rename the backbone's tensors into our names (through the caller's `get`/`put`)."""
    root = _root(state)

    def conv(ours: str, theirs: str) -> None:
        put(f"{ours}/kernel", _conv_in(get(f"{theirs}.weight")), f"{theirs}.weight")

    def norm(ours: str, theirs: str) -> None:
        put(f"{ours}/scale", get(f"{theirs}.weight"), f"{theirs}.weight")
        put(f"{ours}/bias", get(f"{theirs}.bias"), f"{theirs}.bias")

    conv("conv_root", root + "conv")
    norm("gn_root", root + "norm")
    units = sorted(
        {(int(m[1]), int(m[2])) for k in state if (m := _UNIT_RE.match(k[len(BACKBONE) :]))}
    )
    for stage, unit in units:
        ours, theirs = f"block{stage + 1}/unit{unit + 1}", f"{BACKBONE}stages.{stage}.blocks.{unit}"
        for k, (conv_name, norm_name) in enumerate(_LAYERS, start=1):
            conv(f"{ours}/conv{k}", f"{theirs}.{conv_name}")
            norm(f"{ours}/gn{k}", f"{theirs}.{norm_name}")
        if f"{theirs}.downsample.conv.weight" in state:
            conv(f"{ours}/conv_proj", f"{theirs}.downsample.conv")
            norm(f"{ours}/gn_proj", f"{theirs}.downsample.norm")


def from_ours(flat: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    """Our stem's tensors under timm's names (the stem alone, or a whole ResNetV2)."""
    root = BACKBONE + ("stem." if config.resnet_stages else "")
    tensors: dict[str, np.ndarray] = {}

    def conv(theirs: str, ours: str) -> None:
        tensors[f"{theirs}.weight"] = np.ascontiguousarray(
            flat[f"{ours}/kernel"].transpose(3, 2, 0, 1)
        )

    def norm(theirs: str, ours: str) -> None:
        tensors[f"{theirs}.weight"] = flat[f"{ours}/scale"]
        tensors[f"{theirs}.bias"] = flat[f"{ours}/bias"]

    conv(root + "conv", "conv_root")
    norm(root + "norm", "gn_root")
    for stage, units in enumerate(config.resnet_stages):
        for unit in range(units):
            ours, theirs = (
                f"block{stage + 1}/unit{unit + 1}",
                f"{BACKBONE}stages.{stage}.blocks.{unit}",
            )
            for k, (conv_name, norm_name) in enumerate(_LAYERS, start=1):
                conv(f"{theirs}.{conv_name}", f"{ours}/conv{k}")
                norm(f"{theirs}.{norm_name}", f"{ours}/gn{k}")
            if f"{ours}/conv_proj/kernel" in flat:
                conv(f"{theirs}.downsample.conv", f"{ours}/conv_proj")
                norm(f"{theirs}.downsample.norm", f"{ours}/gn_proj")
    return tensors


def architecture(config: ViTConfig) -> str | None:
    """The registered timm name whose backbone is exactly `config`'s stem, or None."""
    if config.resnet_width != 64:
        return None
    return ARCHITECTURES.get(tuple(config.resnet_stages))


def first_conv(config: ViTConfig) -> str:
    return BACKBONE + ("stem.conv" if config.resnet_stages else "conv")


def parse_name(tokens: list[str]) -> dict[str, Any] | None:
    """timm hybrid name tokens ('vit', 'base', 'r50', 's16', '384') → the stem's fields, or None."""
    if (
        len(tokens) < 4
        or not re.fullmatch(r"r\d*", tokens[2])
        or not re.fullmatch(r"s\d+", tokens[3])
    ):
        return None
    stride = int(tokens[3][1:])
    stages = _NAME_STAGES.get(tokens[2])
    patches = [int(t[1:]) for t in tokens[4:] if re.fullmatch(r"p\d+", t)]
    if tokens[2] == "r50":
        stages = (3, 4, 9) if stride == 16 else (3, 4, 6, 3)
    elif tokens[2] == "r20" and patches == [2]:
        stages = (2, 4)  # vit_small_r20_s16_p2_224
    if stages is None:
        raise ValueError(
            f"timm hybrid {'_'.join(tokens)!r}: backbone {tokens[2]!r} is not a ResNetV2 stem; "
            f"allowed: r, r20, r26, r50 (the vit_*_r*_s* models)"
        )
    fields: dict[str, Any] = dict(
        resnet_stages=stages,
        resnet_width=64,
        patch_size=(patches[0],) * 2 if patches else (1, 1),
        resnet_norm_epsilon=1e-5,
        resnet_ws_epsilon=1e-8,
    )
    sizes = [int(t) for t in tokens[4:] if t.isdigit()]
    if sizes:
        fields["image_size"] = sizes[0]
    return fields


def construction(config: ViTConfig) -> list[str]:
    """The timm lines that build a hybrid whose backbone no registered name has."""
    channels = [4 * config.resnet_width * 2**i for i in range(len(config.resnet_stages))]
    if config.resnet_stages:
        backbone = (
            f"ResNetV2(layers={tuple(config.resnet_stages)}, channels={tuple(channels)}, "
            f"stem_chs={config.resnet_width}, num_classes=0, global_pool='', preact=False, "
            f"stem_type='same', conv_layer=partial(StdConv2dSame, eps=1e-8))"
        )
    else:
        backbone = (
            f"create_resnetv2_stem({config.num_channels}, out_chs={config.resnet_width}, "
            f"stem_type='same', preact=False, conv_layer=partial(StdConv2dSame, eps=1e-8))"
        )
    return [
        "from functools import partial",
        "from timm.layers import StdConv2dSame",
        "from timm.models.resnetv2 import ResNetV2, create_resnetv2_stem",
        "from timm.models.vision_transformer import VisionTransformer",
        "from timm.models.vision_transformer_hybrid import HybridEmbed",
        f"backbone = {backbone}",
    ]
