"""Analytic FLOPs of a ViT forward pass (a multiply-add counts as 2), to cross-check XLA's count.

Only matrix products are counted: patch embedding, per block the q/k/v/out projections (8·T·D²),
QKᵀ and attention·V (4·T²·D) and the MLP (4·T·D·M), and the head. ViT-B/16 at 224 px: 35.1 GFLOP
per image. Norms, softmax and GELU add well under 1 %.
"""

from __future__ import annotations

from vit_jax.model.config import ViTConfig


def num_tokens(config: ViTConfig) -> int:
    gh, gw = config.grid_size
    return gh * gw + config.num_prefix_tokens


def forward_flops(config: ViTConfig) -> float:
    """FLOPs of one image through the model (inference)."""
    d, m = config.hidden_size, config.mlp_dim
    patches = config.grid_size[0] * config.grid_size[1]
    t = num_tokens(config)
    ph, pw = config.patch_size
    embed = 2 * patches * ph * pw * config.num_channels * d
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
