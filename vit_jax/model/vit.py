"""The Vision Transformer (Dosovitskiy et al., 2020) as Flax linen modules.

`VisionTransformer.__call__` reads as the paper's recipe, in order (a hybrid first runs a ResNet
stem, `model/resnet.py`, and cuts the patches from its feature map):
  1. split the image into P×P patches, flatten each and embed it linearly (`PatchEmbedding`);
  2. prepend the class token (and register tokens), add position embeddings (`AddPositionEmbs`);
  3. a stack of pre-LayerNorm Transformer blocks and a final LayerNorm (`Encoder`);
  4. pool the tokens (class token, mean, or attention probe) and classify (`head`).

Parameter names are those of the published vit_jax checkpoints (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1`, ...),
so a published `.npz` is a plain unflatten. Options add keys; they never rename these.
This module knows nothing of data, sharding or checkpoints.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.model import conv
from vit_jax.model.config import REMAT_POLICIES, ViTConfig, get_config
from vit_jax.model.layers import EncoderBlock, MAPHead, drop_path_rates, layer_norm
from vit_jax.model.resnet import resnet_stem

Array = jax.Array


def patchify(images: Array, patch_size: int | tuple[int, int]) -> Array:
    """(B, H, W, C) images → (B, H/P * W/P, P*P*C) flattened patches, in row-major grid order."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    b, h, w, c = images.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not divisible by patch_size {(ph, pw)}")
    patches = images.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, (h // ph) * (w // pw), ph * pw * c)


def posemb_sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> Array:
    """Fixed 2-D sin-cos position embeddings (as in big_vision and MoCo v3): (1, gh*gw, width)."""
    if width % 4:
        raise ValueError(f"hidden_size={width} must be divisible by 4 for posemb='sincos2d'")
    y, x = np.mgrid[: grid[0], : grid[1]]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    emb = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(emb[None], jnp.float32)


def resize_posemb_grid(
    posemb: Array, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> Array:
    """Bilinear resampling of (1, old_h*old_w, D) patch position embeddings to a new grid."""
    if tuple(old_grid) == tuple(new_grid):
        return posemb
    grid = posemb.reshape(1, *old_grid, posemb.shape[-1])
    grid = jax.image.resize(grid, (1, *new_grid, posemb.shape[-1]), method="bilinear")
    return grid.reshape(1, new_grid[0] * new_grid[1], posemb.shape[-1])


class PatchEmbedding(nn.Module):
    """A linear map of each flattened P×P patch: a conv whose kernel and stride are both P."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        ph, pw = cfg.patch_size
        pdtype = jnp.dtype(cfg.param_dtype)
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (ph, pw, cfg.stem_channels, cfg.hidden_size),
            pdtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (cfg.hidden_size,), pdtype)
        dtype = jnp.dtype(cfg.dtype)
        x = conv.conv2d(images.astype(dtype), kernel.astype(dtype), (ph, pw), "VALID")
        b, gh, gw, d = x.shape
        return (x + bias.astype(dtype)).reshape(b, gh * gw, d)


class AddPositionEmbs(nn.Module):
    """Adds position embeddings to the patch tokens and prepends the class/register tokens."""

    config: ViTConfig

    @nn.compact
    def __call__(self, patches: Array, prefix: Array | None, grid: tuple[int, int]) -> Array:
        cfg = self.config

        def with_prefix(x: Array) -> Array:
            return x if prefix is None else jnp.concatenate([prefix, x], axis=1)

        if cfg.posemb == "none":
            return with_prefix(patches)
        if cfg.posemb == "sincos2d":
            return with_prefix(
                patches + posemb_sincos_2d(grid, cfg.hidden_size).astype(patches.dtype)
            )
        n_prefix = cfg.num_prefix_tokens if cfg.posemb_covers_prefix else 0
        built_grid = cfg.grid_size
        posemb = self.param(
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, n_prefix + built_grid[0] * built_grid[1], cfg.hidden_size),
            jnp.dtype(cfg.param_dtype),
        )
        # Another input resolution resamples the patch rows; class/register rows stay as they are.
        patch_posemb = resize_posemb_grid(posemb[:, n_prefix:], built_grid, grid)
        posemb = jnp.concatenate([posemb[:, :n_prefix], patch_posemb], axis=1).astype(patches.dtype)
        if cfg.posemb_covers_prefix:
            return with_prefix(patches) + posemb
        return with_prefix(patches + posemb)


class Encoder(nn.Module):
    """Position embeddings, the block stack (a Python loop, or `nn.scan`), and the final LayerNorm.

    Returns the encoded tokens, the attention weights (L, B, heads, T, T) when asked for, and the
    output tokens of every layer (L, B, T, D).
    """

    config: ViTConfig
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, patches: Array, prefix: Array | None, grid: tuple[int, int]):
        cfg = self.config
        x = AddPositionEmbs(cfg, name="posembed_input")(patches, prefix, grid)
        x = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x)

        rates = drop_path_rates(cfg)
        block_cls = EncoderBlock
        if cfg.remat_policy != "none":
            policy = REMAT_POLICIES[cfg.remat_policy]
            block_cls = nn.remat(
                EncoderBlock,
                policy=policy and getattr(jax.checkpoint_policies, policy),
                prevent_cse=not cfg.scan,
            )
        block_args = (cfg, self.deterministic, self.return_weights)
        if cfg.scan:
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=0,
                length=cfg.num_layers,
            )
            x, (weights, tokens) = stack(*block_args, name="encoderblock")(x, rates)
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                x, outputs = block_cls(*block_args, name=f"encoderblock_{i}")(x, rates[i])
                per_layer.append(outputs)
            weights, tokens = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        if not cfg.fc_norm:
            x = layer_norm(cfg, "encoder_norm")(x)
        return x, weights, tokens


class VisionTransformer(nn.Module):
    """ViT. `model.apply(variables, images)` → logits (B, num_classes), float32.

    `images` are (B, H, W, C) in [-1, 1]; H, W may differ from `config.image_size` (learned position
    embeddings are resampled to the new grid). `train=True` turns dropout/drop-path on (pass
    `rngs={'dropout': key}`). `return_attention` / `return_intermediates` make it return
    `(logits, aux)` with `aux['attention']` (L, B, heads, T, T) and/or `aux['tokens']` (L, B, T, D),
    `aux['encoded']` (B, T, D) and `aux['pre_logits']` (B, D). With `distillation_token` (DeiT) the
    logits are the mean of the class-token head and `head_dist`, and `return_intermediates` adds
    `aux['head_logits']` = (class-token logits, distillation logits).
    """

    config: ViTConfig

    @nn.compact
    def __call__(
        self,
        images: Array,
        *,
        train: bool = False,
        return_attention: bool = False,
        return_intermediates: bool = False,
    ):
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
            raise ValueError(
                f"images of shape {images.shape}: expected (batch, height, width, "
                f"{cfg.num_channels})"
            )
        ph, pw = cfg.pixels_per_token
        if images.shape[1] % ph or images.shape[2] % pw:
            stem = f" × the ResNet stem's stride {cfg.stem_stride}" if cfg.is_hybrid else ""
            raise ValueError(
                f"image size {images.shape[1:3]} is not divisible by patch_size {cfg.patch_size}"
                f"{stem}; allowed: multiples of {(ph, pw)}"
            )
        grid = (images.shape[1] // ph, images.shape[2] // pw)
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        # 0. Hybrids (paper §3.1): a ResNet stem first; the patches are cut from its feature map.
        if cfg.is_hybrid:
            images = resnet_stem(images, cfg)

        # 1. Patches, flattened and embedded linearly.
        x = PatchEmbedding(cfg, name="embedding")(images)

        # 2. Class token and register tokens (prepended), position embeddings (added, in the encoder).
        batch = x.shape[0]
        prefix = []
        if cfg.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.hidden_size), pdtype)
            prefix.append(jnp.tile(cls, (batch, 1, 1)).astype(dtype))
        if cfg.distillation_token:  # DeiT: right after the class token, as timm orders them
            dist = self.param(
                "dist", nn.initializers.normal(stddev=0.02), (1, 1, cfg.hidden_size), pdtype
            )
            prefix.append(jnp.tile(dist, (batch, 1, 1)).astype(dtype))
        if cfg.num_registers:
            registers = self.param(
                "registers",
                nn.initializers.normal(stddev=0.02),
                (1, cfg.num_registers, cfg.hidden_size),
                pdtype,
            )
            prefix.append(jnp.tile(registers, (batch, 1, 1)).astype(dtype))
        prefix = jnp.concatenate(prefix, axis=1) if prefix else None

        # 3. The pre-LayerNorm Transformer encoder.
        encoded, weights, tokens = Encoder(
            cfg, deterministic=not train, return_weights=return_attention, name="Transformer"
        )(x, prefix, grid)

        # 4. Pooling (each name in model_config.POOLINGS, explicitly) and the classification head.
        if cfg.pool == "token":
            x = encoded[:, 0]
        elif cfg.pool == "gap":
            x = encoded[:, cfg.num_prefix_tokens :].mean(axis=1)
        elif cfg.pool == "map":
            x = MAPHead(cfg, deterministic=not train, name="MAPHead_0")(encoded)
        elif cfg.pool == "none":
            x = encoded
        else:
            raise NotImplementedError(
                f"pool={cfg.pool!r} is listed in model_config.POOLINGS but VisionTransformer "
                f"does not handle it (step 4 of models.py)"
            )
        if cfg.fc_norm:
            x = layer_norm(cfg, "fc_norm")(x)
        if cfg.representation_size is not None:
            x = nn.Dense(
                cfg.representation_size, dtype=dtype, param_dtype=pdtype, name="pre_logits"
            )(x)
            x = jnp.tanh(x)
        pre_logits = x
        heads = [("head", x)]
        if cfg.distillation_token:  # DeiT's second head reads the distillation token
            heads.append(("head_dist", encoded[:, 1]))
        if cfg.num_classes:
            heads = [
                (
                    name,
                    nn.Dense(
                        cfg.num_classes,
                        dtype=dtype,
                        param_dtype=pdtype,
                        kernel_init=nn.initializers.zeros,
                        bias_init=nn.initializers.constant(cfg.head_bias_init),
                        name=name,
                    )(tokens_in),
                )
                for name, tokens_in in heads
            ]
        head_logits = tuple(out.astype(jnp.float32) for _, out in heads)
        # DeiT (timm VisionTransformerDistilled in eval): the prediction is the mean of both heads.
        logits = sum(head_logits) / len(head_logits)

        if not (return_attention or return_intermediates):
            return logits
        aux: dict[str, Any] = {}
        if return_attention:
            aux["attention"] = weights
        if return_intermediates:
            aux.update(tokens=tokens, encoded=encoded, pre_logits=pre_logits)
            if cfg.distillation_token:
                aux["head_logits"] = head_logits  # (class-token head, distillation head)
        return logits, aux


def create_model(variant: str | ViTConfig | None = None, **overrides) -> VisionTransformer:
    """`create_model('ViT-B/16', num_classes=10, image_size=384)` → a linen `VisionTransformer`."""
    return VisionTransformer(get_config(variant, **overrides))


def dummy_input(config: ViTConfig, batch_size: int = 1) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, *config.image_size, config.num_channels), jnp.float32)


def init_params(model: VisionTransformer, rng: Array) -> dict:
    """Freshly initialized parameters for `model` at its configured image size."""
    images = jnp.zeros(dummy_input(model.config).shape, jnp.float32)
    return model.init(rng, images)["params"]


def param_shapes(model: VisionTransformer) -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def stack_layers(params: dict, num_layers: int) -> dict:
    """Loop layout (`Transformer/encoderblock_{i}`) → scan layout (`Transformer/encoderblock`)."""
    encoder = dict(params["Transformer"])
    blocks = [encoder.pop(f"encoderblock_{i}") for i in range(num_layers)]
    encoder["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return {**params, "Transformer": encoder}


def unstack_layers(params: dict) -> dict:
    """Scan layout (`Transformer/encoderblock`) → loop layout (`Transformer/encoderblock_{i}`)."""
    encoder = dict(params["Transformer"])
    stacked = encoder.pop("encoderblock")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        encoder[f"encoderblock_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "Transformer": encoder}
