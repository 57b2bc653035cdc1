"""Every hyperparameter of a Vision Transformer, in one frozen dataclass, plus the named variants.

A `ViTConfig` is validated when it is built (bad values raise `ValueError` naming the value and what is
allowed, before any compute), is hashable (so it can be a linen attribute), and round-trips through JSON
(`to_json` / `from_json`), which is how checkpoints remember the model they belong to.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

# Pooling of the encoded tokens before the head ('none': every token, for features). A new one is
# handled in step 4 of `models.VisionTransformer` (which raises for a name it does not handle), then,
# where it applies: its module in layers.py; configs/common.NO_DECAY (its parameters without weight decay);
# transfer._TOP_ORDER (its top-level key); formats/layout.py (inferring it from a checkpoint) and
# each formats/<format>.py (writing it, or naming it as not representable); visualize.py
# (`from_class_token`: which token the head reads). tests/test_registries.py builds, trains one
# step and exports every entry.
POOLINGS = ("token", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d", "none")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
# Rematerialization (`nn.remat`) policy name → the `jax.checkpoint_policies` function it uses ('none':
# no remat; 'full': save nothing, recompute everything).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": "checkpoint_dots",
    "dots_with_no_batch_dims": "dots_with_no_batch_dims_saveable",
}

# Width, MLP width, heads, depth: the paper's Table 1 (Ti/S from DeiT) and big_vision's larger widths.
WIDTHS: dict[str, dict[str, int]] = {
    "Ti": dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    "S": dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    "M": dict(hidden_size=512, mlp_dim=2048, num_heads=8, num_layers=12),
    "B": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    "L": dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    "So400m": dict(hidden_size=1152, mlp_dim=4304, num_heads=16, num_layers=27),
    "H": dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
    "g": dict(hidden_size=1408, mlp_dim=6144, num_heads=16, num_layers=40),
    "G": dict(hidden_size=1664, mlp_dim=8192, num_heads=16, num_layers=48),
}
PATCH_SIZES = (8, 14, 16, 32)
GROUP_NORM_GROUPS = 32  # of the hybrids' ResNet stem (model/resnet.py)
# The paper's and AugReg's hybrids by their published names: the ViT's width, the ResNet stages, and
# the patch size on the stem's feature map (the name's /N is the total stride, stem × patch).
HYBRIDS: dict[str, dict[str, Any]] = {
    "R+ViT-Ti/16": dict(WIDTHS["Ti"], resnet_stages=(), patch_size=(8, 8)),
    "R26+ViT-S/32": dict(WIDTHS["S"], resnet_stages=(2, 2, 2, 2), patch_size=(1, 1)),
    "R26+ViT-B/32": dict(WIDTHS["B"], resnet_stages=(2, 2, 2, 2), patch_size=(1, 1)),
    "R50+ViT-B/16": dict(WIDTHS["B"], resnet_stages=(3, 4, 9), patch_size=(1, 1)),
    "R50+ViT-L/32": dict(WIDTHS["L"], resnet_stages=(3, 4, 6, 3), patch_size=(1, 1)),
}
# 'R50+ViT-B/16', 'R50+B/16', 'R50+ViT-B_16' and AugReg's file stems 'R_Ti_16', 'R26_S_32', 'R50_L_32'.
_HYBRID_RE = re.compile(r"^R(?P<depth>\d*)(?:\+ViT-|\+|_)(?P<width>[A-Za-z]+)[/_](?P<patch>\d+)$")
_VARIANT_RE = re.compile(r"^(?:ViT-)?(?P<width>[A-Za-z0-9]+)[/_](?P<patch>\d+)$")


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) == 1:  # ml_collections reads `--config.model.patch_size=8` into a tuple as (8,)
        value = value * 2
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(
            f"{name}={value!r}: expected a positive int or a (height, width) pair of them"
        )
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of `vit_jax.model.vit.VisionTransformer`. Defaults are ViT-B/16 at 224 px."""

    # Patches.
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)  # of the stem's feature map in a hybrid
    num_channels: int = 3
    # Hybrid (paper §3.1, `model/resnet.py`): a ResNet stem before the patch embedding. None: none;
    # (): its root alone (stride 4); (3, 4, 9): R50's stages (each after the first halves the map).
    resnet_stages: tuple[int, ...] | None = None
    resnet_width: int = 64  # root width; stage i has 4·width·2^i output channels
    resnet_ws_epsilon: float = 1e-5  # weight standardization: (w - mean) / (std + eps)
    resnet_norm_epsilon: float = 1e-6  # GroupNorm (flax's default, as published; timm: 1e-5)
    # Encoder.
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    layernorm_epsilon: float = 1e-6
    gelu_approximate: bool = True  # tanh GELU as in the published checkpoints; timm/HF use exact.
    qkv_bias: bool = True
    qk_norm: bool = False
    layerscale_init: float | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0  # of the last block; rises linearly from 0 at the first.
    # Tokens and position embeddings.
    class_token: bool | None = None  # None: a class token exactly when pool == "token".
    num_registers: int = 0
    # DeiT: a distillation token after the class token (its own posemb row) read by a second head
    # `head_dist`; the output is the mean of both heads (timm VisionTransformerDistilled).
    distillation_token: bool = False
    posemb: str = "learn"
    posemb_covers_prefix: bool = True  # vit_jax/HF: posemb rows for class/register tokens too.
    # Head.
    pool: str = "token"
    fc_norm: bool = False  # LayerNorm after pooling instead of the encoder's final norm (timm avg).
    representation_size: int | None = None  # pre-logits Dense + tanh
    num_classes: int = 1000  # 0: no head, the model returns the pooled representation.
    head_bias_init: float = 0.0
    # Computation.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # resolved per backend by layers.resolve_attention_impl
    remat_policy: str = "none"
    scan: bool = False

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 frozen
        set_("image_size", _pair(self.image_size, "image_size"))
        set_("patch_size", _pair(self.patch_size, "patch_size"))
        _check_stem(self)
        if self.resnet_stages is not None:
            set_("resnet_stages", tuple(self.resnet_stages))
        _check_choice("pool", self.pool, POOLINGS)
        _check_choice("posemb", self.posemb, POSEMBS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("remat_policy", self.remat_policy, tuple(REMAT_POLICIES))
        stride = self.stem_stride
        for side, image, patch in zip(("height", "width"), self.image_size, self.patch_size):
            if image % (patch * stride):
                stem = f" × the ResNet stem's stride {stride}" if stride > 1 else ""
                sizes = range(1, min(image // stride, 64) + 1)
                fitting = [p for p in sizes if image % (p * stride) == 0]
                raise ValueError(
                    f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
                    f"{stem} (image {side} {image} % {patch * stride} = {image % (patch * stride)}); "
                    f"allowed: a patch size that divides the image ({', '.join(map(str, fitting))} "
                    f"for {side} {image}), or image sizes that are multiples of {patch * stride}"
                )
        for name in ("hidden_size", "mlp_dim", "num_heads", "num_layers", "num_channels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive int")
        classes = self.num_classes
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
            raise ValueError(f"num_classes={classes!r}: expected an int >= 0 (0: no head)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"allowed: num_heads that divide hidden_size"
            )
        if self.pool == "token" and not self.has_class_token:
            raise ValueError(
                "pool='token' needs class_token=True (allowed: class_token True or None)"
            )
        if self.distillation_token and (
            self.pool != "token" or self.representation_size or self.fc_norm
        ):
            raise ValueError(
                f"distillation_token=True with pool={self.pool!r}, representation_size="
                f"{self.representation_size}, fc_norm={self.fc_norm}: allowed only pool='token' "
                f"without pre-logits or fc_norm (DeiT)"
            )
        if self.posemb == "sincos2d" and self.posemb_covers_prefix and self.num_prefix_tokens:
            raise ValueError(
                "posemb='sincos2d' is a function of the patch grid, so it cannot cover class/register "
                "tokens: set posemb_covers_prefix=False"
            )
        if self.num_registers < 0 or self.num_classes < 0:
            raise ValueError(
                f"num_registers={self.num_registers}, num_classes={self.num_classes}: expected >= 0"
            )
        for name in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a rate in [0, 1)")

    @property
    def is_hybrid(self) -> bool:
        return self.resnet_stages is not None

    @property
    def stem_stride(self) -> int:
        """Pixels per feature-map cell before the patch embedding: 1, or the ResNet's 4·2^(n−1)."""
        return stem_stride_of(self.resnet_stages)

    @property
    def stem_channels(self) -> int:
        """Channels the patch embedding sees: the image's, or the ResNet stem's output."""
        if not self.is_hybrid:
            return self.num_channels
        if not self.resnet_stages:
            return self.resnet_width
        return 4 * self.resnet_width * 2 ** (len(self.resnet_stages) - 1)

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        """The image pixels one token covers: the patch size × the stem's stride."""
        return (self.patch_size[0] * self.stem_stride, self.patch_size[1] * self.stem_stride)

    @property
    def grid_size(self) -> tuple[int, int]:
        ph, pw = self.pixels_per_token
        return (self.image_size[0] // ph, self.image_size[1] // pw)

    @property
    def has_class_token(self) -> bool:
        return self.pool == "token" if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.has_class_token) + int(self.distillation_token) + self.num_registers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **overrides) -> ViTConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; allowed: {field_names()}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        return cls().replace(**values)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls.from_dict(json.loads(text))


def stem_stride_of(resnet_stages: tuple[int, ...] | None) -> int:
    """The ResNet stem's stride: 1 without one, 4 for the root (conv /2, max-pool /2), then ×2 for
    every stage after the first."""
    if resnet_stages is None:
        return 1
    return 4 * 2 ** max(len(resnet_stages) - 1, 0)


def _check_stem(cfg: ViTConfig) -> None:
    stages = cfg.resnet_stages
    if stages is None:
        return
    if isinstance(stages, (str, bytes)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in tuple(stages)
    ):
        raise ValueError(
            f"resnet_stages={stages!r}: expected a tuple of positive unit counts per stage, e.g. "
            f"(3, 4, 9) for R50, () for the root alone, or None for no ResNet stem"
        )
    width = cfg.resnet_width
    if not isinstance(width, int) or width <= 0 or width % GROUP_NORM_GROUPS:
        raise ValueError(
            f"resnet_width={width!r}: expected a positive multiple of {GROUP_NORM_GROUPS} (the "
            f"GroupNorm groups), e.g. 64"
        )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ViTConfig)]


def parse_variant(variant: str) -> dict[str, Any]:
    """'ViT-B/16', 'B/16' or 'ViT-B_16' → the width/depth/heads/patch fields of that variant; a
    hybrid's published name ('R50+ViT-B/16', or AugReg's 'R50_L_32') adds its ResNet stages."""
    hybrid = _HYBRID_RE.match(variant.strip()) if isinstance(variant, str) else None
    if hybrid:
        name = f"R{hybrid['depth']}+ViT-{hybrid['width']}/{hybrid['patch']}"
        if name not in HYBRIDS:
            raise ValueError(f"unknown hybrid variant {variant!r}; allowed: {list(HYBRIDS)}")
        return dict(HYBRIDS[name])
    match = _VARIANT_RE.match(variant.strip()) if isinstance(variant, str) else None
    if not match or match["width"] not in WIDTHS:
        raise ValueError(
            f"unknown variant {variant!r}; allowed: '<width>/<patch>' (optionally 'ViT-' prefixed, '_' "
            f"for '/') with width in {list(WIDTHS)} and patch e.g. {list(PATCH_SIZES)}, e.g. 'ViT-B/16'"
        )
    patch = int(match["patch"])
    if patch <= 0:
        raise ValueError(f"variant {variant!r}: patch size must be positive")
    return dict(WIDTHS[match["width"]], patch_size=(patch, patch))


def get_config(variant: str | ViTConfig | None = None, **overrides) -> ViTConfig:
    """A validated config: a named variant (or ViT-B/16 defaults when None) with `overrides` on top."""
    if isinstance(variant, ViTConfig):
        return variant.replace(**overrides)
    base = parse_variant(variant) if variant is not None else {}
    return ViTConfig().replace(**{**base, **overrides})
