"""FlexiViT's PI-resize (Beyer et al., 2023): a patch-embedding kernel for another patch size.

Bilinear resizing (no antialias, half-pixel centres, as torch's and timm's `resample_patch_embed` and
big_vision's `flexi`) is linear: resize(x) = R x for a (new_h·new_w, old_h·old_w) matrix R whose
column i is the resize of the i-th basis patch. The old embedding of a patch x is <x, w>; the new
kernel w' should give <R x, w'> = <x, w> for every x, i.e. Rᵀ w' = w, solved by w' = pinv(Rᵀ) w.
When the new patch is larger (upsampling), Rᵀ has full row rank, so a patch that was upsampled by
the same resize embeds exactly as before; when smaller, w' is the least-squares best.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """R: (new_h·new_w, old_h·old_w), the bilinear resize (no antialias) of a flattened patch."""
    basis = np.eye(old[0] * old[1], dtype=np.float64).reshape(-1, *old)
    resize = jax.vmap(
        lambda patch: jax.image.resize(patch, new, method="bilinear", antialias=False)
    )
    with jax.default_device(jax.devices("cpu")[0]):
        columns = np.asarray(resize(jnp.asarray(basis, jnp.float32)), np.float64)
    return columns.reshape(len(basis), -1).T


def pi_resize_kernel(kernel: np.ndarray, new: tuple[int, int]) -> np.ndarray:
    """(old_h, old_w, C, D) patch-embedding kernel → (new_h, new_w, C, D), by w' = pinv(Rᵀ) w."""
    old = tuple(kernel.shape[:2])
    new = tuple(new)
    if old == new:
        return kernel
    r = resize_matrix(old, new)
    flat = np.asarray(kernel, np.float64).reshape(old[0] * old[1], -1)
    resized = np.linalg.pinv(r.T) @ flat
    return resized.reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)
