"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

import contextlib
import functools
import io
import itertools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import jax
import numpy as np

from vit_jax.model import transfer, vit

REPO = pathlib.Path(__file__).resolve().parents[1]

# The parity fixtures (small models written by other implementations; see fixtures/README.md).
FIXTURES = REPO / "tests" / "fixtures"

# JAX's persistent compilation cache, shared by the tests and the processes they start: many compile
# the same tiny steps, and a repeat is then a load.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"vit_jax_test_compile_cache_{os.getuid()}")


# The tiny recipe, as `--config` takes it: an 11,082-parameter ViT on digits at 16 px, 3 steps with
# checkpoints at 2 and 3 (configs/digits.py documents it); tests override lengths and intervals.
TINY_CONFIG = f"{REPO / 'configs' / 'digits.py'}:tiny"


def subprocess_env(
    *, devices: int | None = None, import_checkout: bool = False, **extra: str
) -> dict[str, str]:
    """The environment for a child process of a test: CPU only, the shared compilation cache.

    `devices`: that many simulated CPU devices (XLA reads the count only when JAX starts).
    `import_checkout`: this checkout first on PYTHONPATH (for `python -c` code and `train.py` in
    another directory). `extra`: more variables, which win over everything above.
    """
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if import_checkout:
        env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def run_with_devices(code: str, devices: int = 8, timeout: int = 300) -> str:
    """Runs `code` in a fresh Python on `devices` simulated CPU devices (XLA reads the device
    count only when JAX starts), importing this checkout; returns its stdout, or fails the test
    with the end of its stderr."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=subprocess_env(devices=devices, import_checkout=True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def dump_python_stacks(procs, wait_s: float = 30) -> None:
    """SIGABRT to each child still running: faulthandler (PYTHONFAULTHANDLER=1 in its environment)
    writes every thread's Python stack to its stderr, which says where a hung run waits."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGABRT)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=wait_s)


def train_py(config: str, workdir, data_dir: str, *extra: str) -> list[str]:
    """The command line of `train.py` (run it from REPO) for `config` in `workdir` on the data of
    `data_dir`, plus `extra` flags."""
    return [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        *extra,
    ]


def load_config(path: str, arg: str | None = None):
    """`get_config(arg)` (`get_config()` without one) of the config file at `path`, relative to
    the checkout or absolute: what `--config path[:arg]` gives, a fresh ConfigDict per call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_under_test", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def tiny_recipe():
    """The tiny recipe (`configs/digits.py:tiny`) as a ConfigDict, fresh per call."""
    return load_config("configs/digits.py", "tiny")


# The model-level tests' ViT (shapes, layouts, conversions; no training): small enough to
# compile in seconds on 2 CPU cores. The training tests use the tiny recipe above.
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=4, image_size=16)


def random_params(model: vit.VisionTransformer, seed: int = 0, scale: float = 0.05):
    """Initialized params plus noise on every leaf: a non-zero head and non-uniform attention, so
    every parameter reaches the logits."""

    @jax.jit
    def init(key):
        params = vit.init_params(model, key)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy)

    return init(jax.random.key(seed))


@functools.cache
def apply_fn(config):
    """The jitted forward pass of the model `config` describes (one compile per config)."""
    return jax.jit(vit.VisionTransformer(config).apply)


def logits_of(config, params, images) -> np.ndarray:
    return np.asarray(apply_fn(config)({"params": params}, images))


def assert_params_identical(a, b, skip=(), same_dtype=False) -> None:
    """The same parameter names, and bit-identical values (but for the names in `skip`)."""
    a, b = transfer.flatten(a), transfer.flatten(b)
    assert sorted(a) == sorted(b)
    for key in a:
        if key in skip:
            continue
        if same_dtype:
            assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _port_block() -> range:
    """This pytest worker's ports: below the kernel's ephemeral range, one block per xdist worker.

    Outgoing connections take their local ports from the ephemeral range, and two workers'
    tests run side by side: a port from `bind(0)` can be handed to both, and JAX's coordinator
    binds with SO_REUSEPORT, so two runs on one port hang each other until the init timeout.
    """
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    size = 400
    top = low - index * size
    return range(max(top - size, 1024), top)


_next_port = itertools.count().__next__


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 that no other test of this session was given."""
    block = _port_block()
    start = os.getpid() % len(block)  # another session beside this one starts elsewhere
    for _ in range(len(block)):
        port = block[(start + _next_port()) % len(block)]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}")


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


def sigterm_at(step: int):
    """An `on_batch` callback (tests/test_trainer.FakeData) that sends this process SIGTERM when
    batch `step` is drawn: a preemption in the middle of an in-process run."""
    import signal

    def on_batch(current):
        if current == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_batch
