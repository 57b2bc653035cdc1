"""timm's side of a model description: its model names and its config.json.

`parse_timm_name` reads the hyperparameters a timm model name implies (facts from timm's model
registry: `timm/models/vision_transformer.py`, `deit.py`); `hub_config_hints` / `hub_preprocessing`
read a timm config.json (`architecture`, `model_args`, `pretrained_cfg`); `hub_config` and
`model_args` write one, so `timm.create_model(architecture, **model_args)` builds our model exactly.
"""

from __future__ import annotations

import math
import re
from typing import Any

from vit_jax.interop import input_convention
from vit_jax.interop.formats import timm_hybrid
from vit_jax.model.config import WIDTHS, ViTConfig

# timm's width names (facts from timm's model registry: vision_transformer.py, deit.py):
# name → (embed_dim, depth, num_heads, mlp_dim).
_TIMM_WIDTHS = {
    "tiny": WIDTHS["Ti"],
    "small": WIDTHS["S"],
    "medium": WIDTHS["M"],
    "base": WIDTHS["B"],
    "large": WIDTHS["L"],
    "so400m": WIDTHS["So400m"],
    "huge": WIDTHS["H"],
    "giant": WIDTHS["g"],
    "gigantic": WIDTHS["G"],
    "mediumd": dict(hidden_size=512, mlp_dim=2048, num_heads=8, num_layers=20),
    "betwixt": dict(hidden_size=640, mlp_dim=2560, num_heads=10, num_layers=12),
    "wee": dict(hidden_size=256, mlp_dim=1280, num_heads=4, num_layers=14),  # mlp_ratio 5
    "little": dict(hidden_size=320, mlp_dim=1792, num_heads=5, num_layers=14),  # mlp_ratio 5.6
    "so150m": dict(hidden_size=896, mlp_dim=2304, num_heads=14, num_layers=18),  # mlp_ratio 2.572
    "giantopt": dict(hidden_size=1536, mlp_dim=6144, num_heads=16, num_layers=40),
}
_FAMILIES = ("vit", "deit", "deit3")
# SigLIP 2 image towers use tanh GELU (timm `act_layer='gelu_tanh'`); SigLIP 1 ones exact GELU.
_TANH_GELU = re.compile(
    r"^vit_(base_patch32_siglip|so400m_patch16_siglip|large_patch16_siglip(_gap)?_512|giantopt_)"
)
_UNSUPPORTED = ("clip", "xp", "rope", "18x2", "pwee", "dwee", "dpwee", "dlittle")


def _tokens(name: str) -> list[str]:
    return name.removeprefix("timm/").removeprefix("hf-hub:timm/").split(".")[0].split("_")


def parse_timm_name(name: str) -> dict[str, Any] | None:
    """A timm model name → the config fields it implies, or None if it is no timm ViT name.

    'vit_base_patch16_224.augreg_in21k' → width/depth/heads/patch/size; the families' own options too:
    `deit3_*` (LayerScale, posemb without class row), `*_reg4*` (registers), `*_gap*` (mean pooling,
    no class token), `*_siglip*` (MAP pooling, no class token; tanh GELU for SigLIP 2 sizes),
    `*_dinov2`, `vit_betwixt/wee/little/medium(d)_*_reg*` (LayerScale).
    """
    if not isinstance(name, str):
        return None
    tokens = _tokens(name)
    if tokens[0] == "vit" and len(tokens) > 1 and tokens[1] in _TIMM_WIDTHS:
        hybrid = timm_hybrid.parse_name(tokens)  # vit_base_r50_s16_384: a ResNet stem first
        if hybrid is not None:
            return {**_TIMM_WIDTHS[tokens[1]], **hybrid}
    patches = [int(t[5:]) for t in tokens if re.fullmatch(r"patch\d+", t)]
    if (
        len(tokens) < 3
        or tokens[0] not in _FAMILIES
        or tokens[1] not in _TIMM_WIDTHS
        or not patches
    ):
        return None
    unsupported = [t for t in tokens if t in _UNSUPPORTED]
    if unsupported or tokens[1] == "giant" and "dinov2" in tokens:
        raise ValueError(
            f"timm model {name!r}: its {unsupported or ['SwiGLU MLP']} variant has layers this "
            f"model does not have (allowed: plain, reg, gap, map, siglip, dinov2, deit, deit3 names)"
        )
    fields: dict[str, Any] = dict(_TIMM_WIDTHS[tokens[1]], patch_size=(patches[0], patches[0]))
    sizes = [int(t) for t in tokens[2:] if t.isdigit()]
    if sizes:
        fields["image_size"] = sizes[0]
    registers = [int(t[3:]) for t in tokens if re.fullmatch(r"reg\d+", t)]
    if registers:
        fields.update(num_registers=registers[0], posemb_covers_prefix=False)
    if "distilled" in tokens:  # deit_*_distilled_*: DeiT's distillation token and head_dist
        fields["distillation_token"] = True
    if tokens[0] == "deit3":
        fields.update(layerscale_init=1e-6, posemb_covers_prefix=False)
    elif "dinov2" in tokens or (
        registers and tokens[1] in ("betwixt", "wee", "little", "medium", "mediumd")
    ):
        fields["layerscale_init"] = 1e-5
    if "siglip" in tokens:
        fields.update(class_token=False, pool="gap" if "gap" in tokens else "map")
        fields["fc_norm"] = False
        fields["gelu_approximate"] = bool(_TANH_GELU.match("_".join(tokens)))
    elif "gap" in tokens:
        fields.update(class_token=False, pool="gap", fc_norm=True)  # timm: avg pooling → fc_norm
    elif "map" in tokens:
        fields.update(class_token=False, pool="map")
    return fields


def name_preprocessing(name: str) -> input_convention.Preprocessing | None:
    """The input convention a timm name's weights expect (DeiT and DINOv2: ImageNet mean/std)."""
    tokens = _tokens(name) if isinstance(name, str) else []
    if tokens and (tokens[0] in ("deit", "deit3") or "dinov2" in tokens):
        return input_convention.IMAGENET
    return None


_POOLS = {"token": "token", "avg": "gap", "map": "map", "": "none"}
_ACT = {"gelu": False, "gelu_tanh": True}


def hub_config_hints(hub: dict[str, Any]) -> dict[str, Any]:
    """A timm config.json ('architecture', 'model_args') → config fields."""
    hints = parse_timm_name(hub.get("architecture", "")) or {}
    args = hub.get("model_args", {})
    renames = dict(
        num_heads="num_heads",
        img_size="image_size",
        in_chans="num_channels",
        embed_dim="hidden_size",
        depth="num_layers",
        qkv_bias="qkv_bias",
        qk_norm="qk_norm",
        class_token="class_token",
        reg_tokens="num_registers",
        fc_norm="fc_norm",
    )
    hints.update({ours: args[theirs] for theirs, ours in renames.items() if theirs in args})
    if "no_embed_class" in args:
        hints["posemb_covers_prefix"] = not args["no_embed_class"]
    if args.get("global_pool") in _POOLS:
        hints["pool"] = _POOLS[args["global_pool"]]
    if args.get("init_values") is not None:
        hints["layerscale_init"] = args["init_values"]
    act = args.get("act_layer")
    if act is not None:
        if act not in _ACT:
            raise ValueError(f"timm config act_layer={act!r}: allowed {sorted(_ACT)}")
        hints["gelu_approximate"] = _ACT[act]
    if args.get("pos_embed") == "none":
        hints["posemb"] = "none"
    return hints


def hub_preprocessing(hub: dict[str, Any]) -> input_convention.Preprocessing | None:
    """mean/std of a timm config.json (`pretrained_cfg`, or top level in older files)."""
    cfg = hub.get("pretrained_cfg") or hub
    if "mean" not in cfg or "std" not in cfg:
        return name_preprocessing(hub.get("architecture", ""))
    method = cfg.get("interpolation", "bilinear")
    return input_convention.Preprocessing(
        mean=cfg["mean"],
        std=cfg["std"],
        resize=method if method in input_convention.RESIZE_METHODS else "bilinear",
    )


def architecture(config: ViTConfig) -> str:
    """A registered timm name of the same width (`model_args` override all of its settings)."""
    if config.distillation_token:  # timm builds the distillation token only in this class
        return "deit_base_distilled_patch16_224"
    if config.is_hybrid:  # the name fixes the backbone; model_args set the Transformer
        return timm_hybrid.architecture(config) or "vit_base_r50_s16_224"
    for width in ("tiny", "small", "base", "large", "huge"):
        if _TIMM_WIDTHS[width]["hidden_size"] == config.hidden_size:
            return f"vit_{width}_patch16_224"
    return "vit_base_patch16_224"


def mlp_ratio(hidden_size: int, mlp_dim: int) -> float:
    """The float nearest mlp_dim / hidden_size for which timm's MLP width `int(dim * mlp_ratio)` is
    exactly mlp_dim: the plain quotient can round below it (960 / 352 builds 959 units)."""
    ratio = mlp_dim / hidden_size
    while int(hidden_size * ratio) < mlp_dim:  # at most a few ulps up
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def model_args(config: ViTConfig) -> dict[str, Any]:
    """timm `VisionTransformer` keyword arguments that build exactly `config`'s model."""
    square = lambda pair: pair[0] if pair[0] == pair[1] else list(pair)  # noqa: E731
    pools = {v: k for k, v in _POOLS.items()}
    args = dict(
        img_size=square(config.image_size),
        patch_size=square(config.patch_size),
        in_chans=config.num_channels,
        num_classes=config.num_classes,
        global_pool=pools[config.pool],
        embed_dim=config.hidden_size,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=mlp_ratio(config.hidden_size, config.mlp_dim),
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm,
        init_values=config.layerscale_init,
        class_token=config.has_class_token,
        reg_tokens=config.num_registers,
        # A sin-cos table is written as pos_embed without class/register rows.
        no_embed_class=not config.posemb_covers_prefix or config.posemb == "sincos2d",
        fc_norm=config.fc_norm,
    )
    if config.posemb == "none":
        args["pos_embed"] = "none"
    if config.gelu_approximate:
        args["act_layer"] = "gelu_tanh"
    return args


def hub_config(config: ViTConfig, pre: input_convention.Preprocessing) -> dict[str, Any]:
    """timm's config.json: what `timm.create_model` reads from a hub folder."""
    args = model_args(config)
    return {
        "architecture": architecture(config),
        "num_classes": config.num_classes,
        "num_features": config.hidden_size,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [config.num_channels, *config.image_size],
            "interpolation": pre.resize,
            "crop_pct": 1.0,  # resized whole, as evaluation here does
            "mean": list(pre.mean),
            "std": list(pre.std),
            "num_classes": config.num_classes,
            "first_conv": timm_hybrid.first_conv(config)
            if config.is_hybrid
            else "patch_embed.proj",
            "classifier": "head",
        },
    }


def not_in_hub_config(config: ViTConfig) -> list[str]:
    """What timm's config.json cannot say (norm_layer is a callable there)."""
    missing = []
    if config.layernorm_epsilon != 1e-6:
        missing.append(
            f"layernorm_epsilon={config.layernorm_epsilon} (timm builds LayerNorm eps=1e-6)"
        )
    if config.is_hybrid and timm_hybrid.architecture(config) is None:
        missing.append(
            f"resnet_stages={config.resnet_stages}, resnet_width={config.resnet_width}: no timm "
            f"name builds this backbone (build it as `how_to_load` says)"
        )
    if config.is_hybrid and (config.resnet_norm_epsilon, config.resnet_ws_epsilon) != (1e-5, 1e-8):
        missing.append(
            f"resnet_norm_epsilon={config.resnet_norm_epsilon}, resnet_ws_epsilon="
            f"{config.resnet_ws_epsilon} (timm builds GroupNorm eps=1e-5, StdConv2dSame eps=1e-8)"
        )
    return missing
