"""Every attention/GELU fast path computes the reference function: same logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, random_params

from vit_jax.model import layers, vit

IMAGES = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), jnp.float32, -1, 1)


def logits_and_grads(model, params):
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, IMAGES)))  # noqa: E731
    return model.apply({"params": params}, IMAGES), jax.grad(loss)(params)


@pytest.mark.parametrize("impl", ["einsum", "auto"])
def test_attention_impls_match_jax_dot_product_attention(impl):
    reference = vit.create_model(None, attention_impl="xla", **TINY)
    params = random_params(reference)
    ref_logits, ref_grads = logits_and_grads(reference, params)
    logits, grads = logits_and_grads(vit.create_model(None, attention_impl=impl, **TINY), params)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    # atol: the key bias's gradient is exactly 0 in math (softmax ignores a per-query constant),
    # so both sides hold float noise of ~1e-6 there.
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_resolves_per_backend():
    cfg = vit.get_config(None, attention_impl="auto", **TINY)
    assert layers.resolve_attention_impl(cfg, "cpu") == "einsum"
    assert layers.resolve_attention_impl(cfg, "tpu") == "xla"
    assert layers.resolve_attention_impl(cfg, "gpu") == "xla"  # float32: no cuDNN flash path
    assert layers.resolve_attention_impl(cfg.replace(dtype="bfloat16"), "gpu") == "cudnn"
    assert layers.resolve_attention_impl(cfg.replace(attention_impl="xla"), "cpu") == "xla"


@pytest.mark.parametrize(
    "q_tokens, kv_tokens, multiple",
    [(197, 197, 64), (197, 197, 2), (1, 197, 2), (1, 6, 2), (5, 8, 4)],  # (1, T): MAP's probe
)
def test_padded_attention_equals_unpadded_in_values_and_gradients(q_tokens, kv_tokens, multiple):
    q = jax.random.normal(jax.random.key(0), (2, q_tokens, 3, 16))
    k, v = (jax.random.normal(jax.random.key(i), (2, kv_tokens, 3, 16)) for i in (1, 2))

    def grads(fn):
        return jax.grad(lambda *x: jnp.sum(jnp.sin(fn(*x))), argnums=(0, 1, 2))(q, k, v)

    padded = lambda *x: layers.padded_dot_product_attention(*x, multiple, "xla")  # noqa: E731
    np.testing.assert_allclose(padded(q, k, v), jax.nn.dot_product_attention(q, k, v), atol=1e-5)
    for a, b in zip(grads(padded), grads(jax.nn.dot_product_attention)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("pool", ["token", "map"])  # 17 tokens (padded); 16 + MAP's 1-token probe
def test_cudnn_route_gives_the_reference_logits(monkeypatch, pool):
    """The layer's cuDNN branch (padding; self- and MAP's cross-attention), with XLA's kernel standing
    in for cuDNN's, which CPU lacks: jax.nn.dot_product_attention is asked for 'cudnn' and runs
    'xla' instead (the `gpu` test below runs the real kernel)."""
    reference = vit.create_model(None, attention_impl="einsum", pool=pool, **TINY)
    params = random_params(reference)
    ref_logits = reference.apply({"params": params}, IMAGES)
    kernel = jax.nn.dot_product_attention
    asked = []

    def xla_for_cudnn(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return kernel(*args, implementation="xla" if implementation == "cudnn" else implementation,
                      **kwargs)  # fmt: skip

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_for_cudnn)
    logits = vit.create_model(None, attention_impl="cudnn", pool=pool, **TINY).apply(
        {"params": params}, IMAGES
    )
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert asked and set(asked) == {"cudnn"}


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("pool", ["token", "map"])
def test_cudnn_kernel_gives_the_reference_logits_on_a_gpu(pool):
    reference = vit.create_model(None, attention_impl="einsum", pool=pool, dtype="bfloat16", **TINY)
    params = random_params(reference)
    ref_logits = reference.apply({"params": params}, IMAGES)
    logits = vit.create_model(
        None, attention_impl="cudnn", pool=pool, dtype="bfloat16", **TINY
    ).apply({"params": params}, IMAGES)
    np.testing.assert_allclose(logits, ref_logits, rtol=2e-2, atol=2e-2)


def test_tanh_gelu_in_sigmoid_form_is_flax_tanh_gelu():
    x = jnp.linspace(-8, 8, 1001)
    np.testing.assert_allclose(layers.gelu(x, True), jax.nn.gelu(x, approximate=True), atol=1e-6)
    g = jax.vmap(jax.grad(lambda t: layers.gelu(t, True)))(x)
    np.testing.assert_allclose(g, jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, True)))(x), atol=1e-5)


def test_erf_gelu_is_jax_exact_gelu_to_float_tolerance():
    x = jnp.linspace(-8, 8, 1001)
    np.testing.assert_allclose(layers.gelu(x, False), jax.nn.gelu(x, approximate=False), atol=1e-6)
    g = jax.vmap(jax.grad(lambda t: layers.gelu(t, False)))(x)
    np.testing.assert_allclose(g, jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, False)))(x), atol=1e-5)
