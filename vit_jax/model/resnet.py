"""The hybrid ViT's stem (paper §3.1): a ResNet whose feature map the patch embedding cuts.

The published hybrids (`R50+ViT-B_16.npz`, AugReg's `R_Ti_16`, `R26_S_32`, `R50_L_32`) use a BiT-style
ResNet-v2 without pre-activation:

  root    weight-standardized 7×7/2 conv → GroupNorm → ReLU → 3×3/2 max-pool (stride 4 in all)
  stages  `resnet_stages[i]` bottleneck units each; stage i has 4·w·2^i output channels (w the root
          width) and its first unit strides by 2 (but stage 0's), so the stem's stride is 4·2^(n−1)

A bottleneck unit: 1×1 conv → GN → ReLU → 3×3 conv (the stride) → GN → ReLU → 1×1 conv (4× wider) →
GN, added to the input (through a 1×1 projection conv + GN where the width or stride changes) → ReLU.

`resnet_stem` is a function, not a module, so that its parameters sit at the top of the ViT's tree
under the published names (`conv_root`, `gn_root`, `block{n}/unit{m}/{conv,gn}{1,2,3,_proj}`): a
published `.npz` stays a plain unflatten. Weight standardization is (w − mean) / (std + ε) over each
output channel's fan-in, as the original code computes it (timm's (w − mean) / √(var + ε) with its
ε = 1e-8 differs from this by less than float32 rounding once GroupNorm follows).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.model import conv
from vit_jax.model.config import ViTConfig

Array = jax.Array
GROUPS = 32  # GroupNorm groups in both the original code and timm's ResNetV2


def weight_standardize(kernel: Array, eps: float) -> Array:
    """Each output channel of an HWIO kernel to zero mean, unit std over its fan-in."""
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    std = jnp.std(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) / (std + eps)


class StdConv(nn.Module):
    """A bias-free conv with TF 'SAME' padding whose kernel is weight-standardized when applied."""

    features: int
    kernel_size: int
    strides: int
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            jnp.dtype(cfg.param_dtype),
        )
        # Standardize in float32: the statistics of a bf16 kernel lose the small deviations.
        kernel = weight_standardize(kernel.astype(jnp.float32), cfg.resnet_ws_epsilon)
        dtype = jnp.dtype(cfg.dtype)
        strides = (self.strides, self.strides)
        return conv.conv2d(x.astype(dtype), kernel.astype(dtype), strides, "SAME")


def group_norm(cfg: ViTConfig, name: str, zero_scale: bool = False) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=GROUPS,
        epsilon=cfg.resnet_norm_epsilon,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        # The last norm of each unit starts at zero, so each unit starts as the identity (BiT).
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )


class BottleneckUnit(nn.Module):
    """One residual bottleneck unit with `4 * features` output channels (non-pre-activation)."""

    features: int
    strides: int
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, out = self.config, 4 * self.features
        residual = x
        if x.shape[-1] != out or self.strides != 1:
            residual = StdConv(out, 1, self.strides, cfg, name="conv_proj")(x)
            residual = group_norm(cfg, "gn_proj")(residual)
        y = nn.relu(group_norm(cfg, "gn1")(StdConv(self.features, 1, 1, cfg, name="conv1")(x)))
        y = StdConv(self.features, 3, self.strides, cfg, name="conv2")(y)
        y = nn.relu(group_norm(cfg, "gn2")(y))
        y = group_norm(cfg, "gn3", zero_scale=True)(StdConv(out, 1, 1, cfg, name="conv3")(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`units` bottleneck units of `4 * features` channels; the first strides by `first_strides`."""

    units: int
    features: int
    first_strides: int
    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.units):
            strides = self.first_strides if i == 0 else 1
            x = BottleneckUnit(self.features, strides, self.config, name=f"unit{i + 1}")(x)
        return x


def resnet_stem(images: Array, cfg: ViTConfig) -> Array:
    """(B, H, W, C) images → the (B, H/s, W/s, channels) feature map, s = `cfg.stem_stride`.

    Call it inside a compact module's `__call__`: its layers become that module's children.
    """
    width = cfg.resnet_width
    x = StdConv(width, 7, 2, cfg, name="conv_root")(images)
    x = nn.relu(group_norm(cfg, "gn_root")(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for i, units in enumerate(cfg.resnet_stages):
        x = ResNetStage(units, width * 2**i, 2 if i else 1, cfg, name=f"block{i + 1}")(x)
    return x
