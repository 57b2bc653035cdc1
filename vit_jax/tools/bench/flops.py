"""Analytic FLOPs of a ViT forward pass (a multiply-add counts as 2), to cross-check XLA's count.

Only matrix products are counted: patch embedding, per block the q/k/v/out projections (8·T·D²),
QKᵀ and attention·V (4·T²·D) and the MLP (4·T·D·M), and the head. ViT-B/16 at 224 px: 35.1 GFLOP
per image. Norms, softmax and GELU add well under 1 %. A hybrid adds its ResNet stem's convolutions
(`stem_flops`; R50+ViT-B/16 at 224 px: 7.87 of 43.07 GFLOP, XLA's count 43.21).
"""

from __future__ import annotations

from vit_jax.model.config import ViTConfig


def num_tokens(config: ViTConfig) -> int:
    gh, gw = config.grid_size
    return gh * gw + config.num_prefix_tokens


def stem_flops(config: ViTConfig) -> float:
    """FLOPs of a hybrid's ResNet stem (0 for a plain ViT): the root conv and every unit's convs."""
    if not config.is_hybrid:
        return 0.0
    h, w = (config.image_size[0] + 1) // 2, (config.image_size[1] + 1) // 2  # root conv, stride 2
    width = config.resnet_width
    total = 2 * h * w * 49 * config.num_channels * width
    h, w, channels = (h + 1) // 2, (w + 1) // 2, width  # max-pool, stride 2
    for stage, units in enumerate(config.resnet_stages):
        mid = width * 2**stage
        for unit in range(units):
            stride = 2 if stage and not unit else 1
            out_h, out_w = (h + stride - 1) // stride, (w + stride - 1) // stride
            total += 2 * h * w * channels * mid  # conv1, 1x1 at the input resolution
            total += 2 * out_h * out_w * (9 * mid * mid + mid * 4 * mid)  # conv2 (3x3), conv3
            if unit == 0:
                total += 2 * out_h * out_w * channels * 4 * mid  # the projection
            h, w, channels = out_h, out_w, 4 * mid
    return float(total)


def forward_flops(config: ViTConfig) -> float:
    """FLOPs of one image through the model (inference)."""
    d, m = config.hidden_size, config.mlp_dim
    patches = config.grid_size[0] * config.grid_size[1]
    t = num_tokens(config)
    ph, pw = config.patch_size
    embed = 2 * patches * ph * pw * config.stem_channels * d + stem_flops(config)
    block = 8 * t * d * d + 4 * t * t * d + 4 * t * d * m
    head = 0
    if config.pool == "map":  # one probe query attending over t tokens, then an MLP
        head += 2 * d * d + 2 * 2 * t * d * d + 4 * t * d + 2 * d * d + 4 * d * m
    width = d
    if config.representation_size:
        head += 2 * d * config.representation_size
        width = config.representation_size
    head += 2 * width * config.num_classes
    return float(embed + config.num_layers * block + head)


def train_step_flops(config: ViTConfig) -> float:
    """Forward + backward ≈ 3× forward (each matmul's two gradients cost one forward each)."""
    return 3.0 * forward_flops(config)
