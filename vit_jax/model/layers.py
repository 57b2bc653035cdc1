"""The Transformer's building blocks: attention, MLP, the pre-LN encoder block, stochastic depth, and
attention pooling. `vit_jax.model.vit` assembles them into the Vision Transformer."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.model.config import ViTConfig

Array = jax.Array


def layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    """The model's LayerNorm (its epsilon, compute and parameter dtypes), named `name`."""
    return nn.LayerNorm(
        cfg.layernorm_epsilon,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        name=name,
    )


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
        x = gelu(x, cfg.gelu_approximate)
        x = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x)
        x = dense(cfg.hidden_size, "Dense_1")(x)
        return nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)(x)


def gelu(x: Array, approximate: bool) -> Array:
    """GELU; `approximate=True` is the tanh form of the published checkpoints, computed exactly.

    0.5·(1 + tanh(z)) = sigmoid(2z), so the tanh form is x·sigmoid(2z): the same function with one
    transcendental instead of tanh plus its chain of adds and multiplies (faster on CPU, same
    values to float rounding). `approximate=False` is the erf form (timm, HF).
    """
    if not approximate:
        # x·Φ(x) through erf, as torch computes it: jax.nn.gelu's erfc form runs ~2.5x slower
        # on CPU for the same values to float tolerance.
        return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))
    z = x + 0.044715 * (x * x * x)
    return x * jax.nn.sigmoid((2.0 * math.sqrt(2.0 / math.pi)) * z).astype(x.dtype)


def resolve_attention_impl(config: ViTConfig, backend: str | None = None) -> str:
    """The attention kernel `config.attention_impl` stands for on `backend` (default: JAX's).

    'auto' picks what measured fastest (README, Performance): on CPU plain einsum-softmax-einsum
    (no layout transposes around the batched matmuls); on GPU cuDNN's fused flash attention for
    16-bit compute when the head size allows it, else XLA; elsewhere XLA.
    """
    impl = config.attention_impl
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "einsum"
    if (
        backend in ("gpu", "cuda")
        and config.dtype in ("bfloat16", "float16")
        and config.head_dim <= 128
        and config.head_dim % 8 == 0
    ):
        return "cudnn"
    return "xla"


# cuDNN's fused attention trains only on even sequence lengths (ViT's 197 tokens are odd): pad the
# tokens to a multiple of this, masking the padded keys and dropping the padded queries.
CUDNN_SEQ_MULTIPLE = 2


def padded_dot_product_attention(
    q: Array, k: Array, v: Array, multiple: int, implementation: str | None
) -> Array:
    """`jax.nn.dot_product_attention` over (B, T, heads, d) inputs, queries and keys each padded to a
    multiple of `multiple` tokens; the same values as unpadded attention (padded keys are masked out,
    padded queries dropped). Queries and keys may differ in length (MAP's one probe over T tokens)."""
    batch, q_tokens, kv_tokens = q.shape[0], q.shape[1], k.shape[1]
    q_pad, kv_pad = -q_tokens % multiple, -kv_tokens % multiple
    if q_pad == kv_pad == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, extra):
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))

    y = jax.nn.dot_product_attention(
        pad(q, q_pad),
        pad(k, kv_pad),
        pad(v, kv_pad),
        query_seq_lengths=jnp.full((batch,), q_tokens, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), kv_tokens, jnp.int32),
        implementation=implementation,
    )
    return y[:, :q_tokens]


class _ProjectionParams(nn.Module):
    """The kernel (D, heads, head_dim) and bias (heads, head_dim) of one nn.DenseGeneral, same names
    and init, returned instead of applied so query/key/value can run as one fused matmul."""

    config: ViTConfig

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array | None]:
        cfg = self.config
        shape = (cfg.num_heads, cfg.head_dim)
        pdtype = jnp.dtype(cfg.param_dtype)

        def kernel_init(rng, kernel_shape, dtype):  # DenseGeneral initializes the 2-D view
            flat = nn.initializers.xavier_uniform()(rng, (in_features, math.prod(shape)), dtype)
            return flat.reshape(kernel_shape)

        kernel = self.param("kernel", kernel_init, (in_features, *shape), pdtype)
        bias = self.param("bias", nn.initializers.zeros, shape, pdtype) if cfg.qkv_bias else None
        return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with flax's parameter layout (query/key/value/out DenseGeneral).

    Self-attention runs the query/key/value projections as one matmul (one wide GEMM instead of
    three narrow ones). The attention itself follows `resolve_attention_impl`: einsum-softmax-einsum,
    `jax.nn.dot_product_attention` (XLA) or cuDNN flash attention, all the same function. When the
    attention weights are wanted (visualization) or attention dropout is active, the einsum path
    is used, since it is the one that materializes softmax(QKᵀ/√d).
    """

    config: ViTConfig
    deterministic: bool = True
    return_weights: bool = False

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array) -> tuple[Array, Array | None]:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        width = inputs_q.shape[-1]
        names = ("query", "key", "value")
        kernels, biases = zip(*(_ProjectionParams(cfg, name=n)(width) for n in names))

        def project(x, kernel, bias):
            y = jnp.einsum("btd,dnh->btnh", x.astype(dtype), kernel.astype(dtype))
            return y if bias is None else y + bias.astype(dtype)

        if inputs_q is inputs_kv:
            kernel = jnp.concatenate(kernels, axis=1)  # (D, 3·heads, head_dim)
            bias = None if biases[0] is None else jnp.concatenate(biases, axis=0)
            q, k, v = jnp.split(project(inputs_q, kernel, bias), 3, axis=2)
        else:
            q = project(inputs_q, kernels[0], biases[0])
            k = project(inputs_kv, kernels[1], biases[1])
            v = project(inputs_kv, kernels[2], biases[2])
        if cfg.qk_norm:
            q, k = layer_norm(cfg, "query_norm")(q), layer_norm(cfg, "key_norm")(k)

        use_dropout = cfg.attention_dropout_rate > 0 and not self.deterministic
        impl = resolve_attention_impl(cfg)
        weights = None
        if self.return_weights or use_dropout or impl == "einsum":
            # Heads next to batch, (B, heads, T, d): XLA CPU's batched matmuls then need no
            # transposed operands (about 2x faster attention, README Performance).
            q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
            # Scaling q (T·d values) is cheaper than scaling the logits (T·T per head).
            q = q * jnp.asarray(1.0 / math.sqrt(cfg.head_dim), dtype)
            logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
            dropped = nn.Dropout(cfg.attention_dropout_rate, deterministic=not use_dropout)(weights)
            y = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", dropped, v), 1, 2)
            if not self.return_weights:
                weights = None
        elif impl == "cudnn":
            y = padded_dot_product_attention(q, k, v, CUDNN_SEQ_MULTIPLE, "cudnn")
        else:
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
        norm = lambda name: layer_norm(cfg, name)  # noqa: E731

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
        # big_vision's MAPHead and timm's attn_pool always have q/k/v biases, whatever the encoder's.
        pool_cfg = cfg.replace(qk_norm=False, attention_dropout_rate=0.0, qkv_bias=True)
        x, _ = MultiHeadDotProductAttention(pool_cfg, name="MultiHeadDotProductAttention_0")(
            probe, x
        )
        y = layer_norm(cfg, "LayerNorm_0")(x)
        x = x + MlpBlock(cfg, self.deterministic, name="MlpBlock_0")(y)
        return x[:, 0]
