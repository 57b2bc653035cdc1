"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

import contextlib
import io
import os
import pathlib
import sys
import tempfile
from unittest import mock

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


# Progress bars on a terminal: tqdm draws only where `stderr.isatty()`; these fake one.
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@contextlib.contextmanager
def fake_terminal():
    """stderr as a terminal for the block (enter it inside the test body: pytest resets
    sys.stderr between a fixture's setup and the test)."""
    stream = FakeTerminal()
    with mock.patch.object(sys, "stderr", stream):
        yield stream


def final_lines(output: str) -> list[str]:
    """What stays on screen: the last frame drawn on each line (bars redraw after '\\r')."""
    return [line.split("\r")[-1].strip() for line in output.split("\n") if line.split("\r")[-1]]


def assert_finished(lines: list[str], desc: str, total: int | str) -> None:
    """The bar `desc` was left on screen complete: `total/total`, 100 %, no ETA left, no '?'."""
    line = next((x for x in lines if x.startswith(f"{desc}:")), None)
    assert line is not None, (desc, lines)
    assert f"{total}/{total}" in line and "100%" in line, line
    assert "?" not in line and "<00:00" in line, line
