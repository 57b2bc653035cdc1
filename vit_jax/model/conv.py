"""The 2-D convolution of the patch embedding and the hybrids' ResNet stem.

`conv2d` is XLA's convolution, except for one thing on CPU: there its gradient is computed as the
gradient of the same convolution written as patches × kernel (one matmul). XLA:CPU runs a
convolution's gradient inside a loop program 20-50x slower than outside one (jax#12868), and the
trainer compiles every step as a loop (`train/step.make_multi_step`): the digits model's 4×4 patch
embedding's gradient took 8.8 ms per step there and a hybrid's 7×7 root 40 ms, against 0.56 and
2.05 ms as a matmul (`python benchmarks/conv_grad.py`, 2 cores). The forward pass stays XLA's everywhere, so
outputs, exports and inference are unchanged; only the float order of the gradient's sums differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
PADDINGS = ("SAME", "VALID")


def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: str) -> Array:
    """NHWC `x` convolved with an HWIO `kernel` at `strides` with TF 'SAME' or 'VALID' padding."""
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r}; allowed: {', '.join(PADDINGS)}")
    strides = tuple(strides)
    if jax.default_backend() == "cpu":
        return _conv_with_matmul_grad(x, kernel, strides, padding)
    return xla_conv(x, kernel, strides, padding)


def xla_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: str) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _padding(size: int, window: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(output size, padding before, padding after) along one axis, as XLA computes them."""
    if padding == "VALID":
        return (size - window) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return out, total // 2, total - total // 2


def matmul_conv(x: Array, kernel: Array, strides: tuple[int, int], padding: str) -> Array:
    """The same convolution as patches × kernel: each output pixel's receptive field, flattened."""
    kh, kw, channels, features = kernel.shape
    (sh, sw), (b, h, w, _) = strides, x.shape
    oh, top, bottom = _padding(h, kh, sh, padding)
    ow, left, right = _padding(w, kw, sw, padding)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    if (kh, kw) == (sh, sw):  # non-overlapping windows (ViT's patches): one reshape
        x = x[:, : oh * kh, : ow * kw].reshape(b, oh, kh, ow, kw, channels)
        patches = x.transpose(0, 1, 3, 2, 4, 5)
    else:  # one strided slice per kernel position, in the kernel's (row, column) order
        windows = [
            x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        patches = jnp.stack(windows, axis=3)
    patches = patches.reshape(b, oh, ow, kh * kw * channels)
    return patches @ kernel.reshape(kh * kw * channels, features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_with_matmul_grad(x, kernel, strides, padding):
    return xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
    return xla_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, cotangent):
    _, vjp = jax.vjp(lambda x, k: matmul_conv(x, k, strides, padding), *residuals)
    return vjp(cotangent)


_conv_with_matmul_grad.defvjp(_forward, _backward)
