"""The Transformer's building blocks: attention, MLP, the pre-LN encoder block, stochastic depth, and
attention pooling. `vit_jax.models` assembles them into the Vision Transformer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.model_config import ViTConfig

Array = jax.Array


class MlpBlock(nn.Module):
    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
            name=name,
        )
        x = dense(cfg.mlp_dim, "Dense_0")(x)
        x = nn.gelu(x, approximate=cfg.gelu_approximate)
        x = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x)
        x = dense(cfg.hidden_size, "Dense_1")(x)
        return nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with flax's parameter layout (query/key/value/out DenseGeneral).

    Uses `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on GPU). When the attention weights
    are wanted (visualization) or attention dropout is active, it computes softmax(QKᵀ/√d)V explicitly.
    """

    config: ViTConfig
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array) -> tuple[Array, Array | None]:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        projection = lambda name: nn.DenseGeneral(  # noqa: E731
            (cfg.num_heads, cfg.head_dim),
            use_bias=cfg.qkv_bias,
            dtype=dtype,
            param_dtype=pdtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )
        q = projection("query")(inputs_q)
        k = projection("key")(inputs_kv)
        v = projection("value")(inputs_kv)
        if cfg.qk_norm:
            norm = lambda name: nn.LayerNorm(  # noqa: E731
                cfg.layernorm_epsilon, dtype=dtype, param_dtype=pdtype, name=name
            )
            q, k = norm("query_norm")(q), norm("key_norm")(k)

        use_dropout = cfg.attention_dropout_rate > 0 and not self.deterministic
        weights = None
        if self.return_weights or use_dropout:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(cfg.head_dim).astype(dtype)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
            dropped = nn.Dropout(cfg.attention_dropout_rate, deterministic=not use_dropout)(weights)
            y = jnp.einsum("bhqk,bkhd->bqhd", dropped, v)
        else:
            impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
            y = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        out = nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            dtype=dtype,
            param_dtype=pdtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(y)
        return out, weights


def drop_path(x: Array, rate: Array, rng: Array) -> Array:
    """Stochastic depth: drop the whole residual branch of some examples, rescaling the rest."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def drop_path_rates(config: ViTConfig) -> Array:
    """Per-block stochastic depth rates, rising linearly from 0 to `config.drop_path_rate` (DeiT)."""
    if config.num_layers == 1:
        return jnp.full((1,), config.drop_path_rate)
    return jnp.linspace(0.0, config.drop_path_rate, config.num_layers)


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); optional LayerScale."""

    config: ViTConfig
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, x: Array, drop_path_rate: Array) -> tuple[Array, tuple[Array | None, Array]]:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            cfg.layernorm_epsilon, dtype=dtype, param_dtype=pdtype, name=name
        )

        def residual(branch: Array, name: str) -> Array:
            if cfg.layerscale_init is not None:
                init = nn.initializers.constant(cfg.layerscale_init)
                branch = branch * self.param(name, init, (cfg.hidden_size,), pdtype).astype(dtype)
            if cfg.drop_path_rate > 0 and not self.deterministic:
                branch = drop_path(branch, drop_path_rate, self.make_rng("dropout"))
            return branch

        y = norm("LayerNorm_0")(x)
        y, weights = MultiHeadDotProductAttention(
            cfg, self.deterministic, self.return_weights, name="MultiHeadDotProductAttention_1"
        )(y, y)
        y = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(y)
        x = x + residual(y, "layerscale_attn")
        y = MlpBlock(cfg, self.deterministic, name="MlpBlock_3")(norm("LayerNorm_2")(x))
        x = x + residual(y, "layerscale_mlp")
        return x, (weights, x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (big_vision's MAPHead)."""

    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        probe = self.param(
            "probe",
            nn.initializers.xavier_uniform(),
            (1, 1, cfg.hidden_size),
            jnp.dtype(cfg.param_dtype),
        )
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
        no_qk_norm = cfg.replace(qk_norm=False, attention_dropout_rate=0.0)
        x, _ = MultiHeadDotProductAttention(no_qk_norm, name="MultiHeadDotProductAttention_0")(
            probe, x
        )
        y = nn.LayerNorm(
            cfg.layernorm_epsilon,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            name="LayerNorm_0",
        )(x)
        x = x + MlpBlock(cfg, self.deterministic, name="MlpBlock_0")(y)
        return x[:, 0]
