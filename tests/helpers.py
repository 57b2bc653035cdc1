"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

import os
import pathlib
import tempfile

import jax

from vit_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]

# The parity fixtures (small models written by other implementations; see fixtures/README.md).
FIXTURES = REPO / "tests" / "fixtures"

# JAX's persistent compilation cache, shared by the tests and the processes they start: many compile
# the same tiny steps, and a repeat is then a load.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"vit_jax_test_compile_cache_{os.getuid()}")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process of a test: CPU only, the shared compilation cache."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **extra,
    }


# A ViT small enough to compile in seconds on 2 CPU cores.
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=4, image_size=16)


def random_params(model: models.VisionTransformer, seed: int = 0, scale: float = 0.05):
    """Initialized params plus noise on every leaf: a non-zero head and non-uniform attention, so
    every parameter reaches the logits."""

    @jax.jit
    def init(key):
        params = models.init_params(model, key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy)

    return init(jax.random.key(seed))
