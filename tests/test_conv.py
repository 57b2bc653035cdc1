"""model/conv.py: XLA's convolution forward everywhere; on CPU its gradient as one matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.model import conv

# (image H, W, channels, kernel, stride, padding): ViT's patches (one divides the image, one does
# not), the hybrid root's 7x7/2, a bottleneck's 3x3 and 1x1 (strided: the projection), odd sizes.
CASES = [
    (16, 16, 3, 4, 4, "VALID"),
    (18, 17, 2, 4, 4, "VALID"),
    (17, 16, 1, 7, 2, "SAME"),
    (9, 9, 4, 3, 1, "SAME"),
    (9, 10, 4, 3, 2, "SAME"),
    (8, 8, 4, 1, 2, "SAME"),
    (11, 11, 2, 3, 2, "VALID"),
]


def _inputs(h, w, c, k, features=5):
    rng = np.random.default_rng(h * 100 + w * 10 + k)
    x = jnp.asarray(rng.normal(size=(2, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c, features)), jnp.float32)
    return x, kernel


@pytest.mark.parametrize("h,w,c,k,s,padding", CASES)
def test_the_forward_pass_is_xlas_convolution_bit_for_bit(h, w, c, k, s, padding):
    x, kernel = _inputs(h, w, c, k)
    expected = jax.lax.conv_general_dilated(
        x, kernel, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_array_equal(conv.conv2d(x, kernel, (s, s), padding), expected)


@pytest.mark.parametrize("h,w,c,k,s,padding", CASES)
def test_the_matmul_form_is_the_same_convolution(h, w, c, k, s, padding):
    x, kernel = _inputs(h, w, c, k)
    expected = conv.xla_conv(x, kernel, (s, s), padding)
    got = conv.matmul_conv(x, kernel, (s, s), padding)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,w,c,k,s,padding", CASES)
def test_the_gradient_equals_xlas_convolution_gradient(h, w, c, k, s, padding):
    x, kernel = _inputs(h, w, c, k)

    def loss(fn):  # a non-linear loss, so the cotangent is not all ones
        return lambda x, k: jnp.sum(jnp.tanh(fn(x, k, (s, s), padding)))

    expected = jax.grad(loss(conv.xla_conv), argnums=(0, 1))(x, kernel)
    got = jax.grad(loss(conv.conv2d), argnums=(0, 1))(x, kernel)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_on_cpu_the_gradient_program_has_no_convolution_and_the_forward_keeps_it():
    """What makes a training step fast inside XLA:CPU's loop programs (the module docstring)."""
    assert jax.default_backend() == "cpu"
    x, kernel = _inputs(16, 16, 3, 4)

    def loss(x, k):
        return jnp.sum(conv.conv2d(x, k, (4, 4), "VALID") ** 2)

    forward = jax.jit(loss).lower(x, kernel).as_text()
    backward = jax.jit(jax.grad(loss, argnums=1)).lower(x, kernel).as_text()
    assert "convolution" in forward
    assert backward.count("convolution") == 1  # the forward pass's, none for the gradient


def test_an_unknown_padding_is_refused_by_name():
    x, kernel = _inputs(8, 8, 1, 2)
    with pytest.raises(ValueError, match=r"padding='same'; allowed: SAME, VALID"):
        conv.conv2d(x, kernel, (2, 2), "same")
