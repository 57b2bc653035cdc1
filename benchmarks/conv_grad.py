r"""A convolution's gradient on CPU: XLA's vs `vit_jax.model.conv.conv2d`'s, alone and in a loop.

  python benchmarks/conv_grad.py    # ~3 min on a 2-core machine; run it with nothing else running

The trainer compiles every step as a loop program (`train/step.make_multi_step`), and XLA:CPU runs
a convolution's gradient 20-50x slower inside one (jax#12868). For each convolution of our models
(the patch embeddings, a hybrid's root and bottleneck convs) it times one weight update through
the convolution (forward, gradient, update) as its own jitted program and as 8 iterations of a
`fori_loop`, with XLA's gradient (`jax.lax.conv_general_dilated`) and with conv2d's (the same
forward, the gradient as patches x kernel). Prints ms per update, median of 3 repeats, and writes
them to `benchmarks/results/cpu_conv_grad.json`.
"""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vit_jax.model import conv  # noqa: E402

LOOP = 8  # iterations per loop program, the digits recipe's steps_per_dispatch
# name: (batch, image size, channels, kernel, stride, padding, features)
CASES = {
    "digits 4x4 patch embedding": (64, 32, 1, 4, 4, "VALID", 64),
    "digits hybrid 7x7/2 root": (64, 32, 1, 7, 2, "SAME", 32),
    "B/16 16x16 patch embedding": (8, 224, 3, 16, 16, "VALID", 768),
    "R50 7x7/2 root": (8, 224, 3, 7, 2, "SAME", 64),
    "R50 3x3 bottleneck conv": (8, 56, 64, 3, 1, "SAME", 64),
}


def time_update(fn, kernel, updates: int) -> float:
    """Median ms per update of `fn(kernel) -> kernel` applying `updates` updates per call."""
    kernel = jax.block_until_ready(fn(kernel))  # compile
    calls = max(1, 16 // updates)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            kernel = fn(kernel)
        jax.block_until_ready(kernel)
        times.append((time.perf_counter() - start) / (calls * updates) * 1e3)
    return statistics.median(times)


def programs(fn, x, stride: int, padding: str):
    """One weight update through `fn` as its own jitted program, and LOOP of them as a loop."""

    def update(kernel, x):
        loss = lambda k: jnp.sum(jnp.tanh(fn(x, k, (stride, stride), padding)))  # noqa: E731
        return kernel - 1e-3 * jax.grad(loss)(kernel)

    alone = jax.jit(update)
    # A different input per iteration, as a training loop's batches are.
    looped = jax.jit(
        lambda k, x: jax.lax.fori_loop(0, LOOP, lambda i, k: update(k, x * (1 + 1e-3 * i)), k)
    )
    return (lambda k: alone(k, x)), (lambda k: looped(k, x))


def measure(batch, size, channels, k, stride, padding, features) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, size, size, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, channels, features)) * 0.1, jnp.float32)
    row = {}
    for label, fn in (("xla", conv.xla_conv), ("conv2d", conv.conv2d)):
        alone, looped = programs(fn, x, stride, padding)
        row[f"{label} alone"] = round(time_update(alone, kernel, 1), 2)
        row[f"{label} in loop"] = round(time_update(looped, kernel, LOOP), 2)
    return row


def main() -> int:
    results = {}
    print("| convolution | XLA alone | XLA in loop | conv2d alone | conv2d in loop |  (ms/update)")
    for name, case in CASES.items():
        row = measure(*case)
        results[name] = row
        cells = " | ".join(f"{row[k]:.2f}" for k in row)
        print(f"| {name} | {cells} |", flush=True)
    out = REPO / "benchmarks" / "results" / "cpu_conv_grad.json"
    meta = {
        "command": "python benchmarks/conv_grad.py",
        "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} device",
        "jax": jax.__version__,
        "loop_iterations": LOOP,
        "unit": "ms per update (forward, gradient, update), median of 3",
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
