"""Our side of the benchmark: the trainer's own jitted step, or jitted inference, ready to time.

`build(model_config, mode, batch_size)` compiles once (timed: `compile_s`) and returns a `Runner`
whose `run(n)` executes n steps and waits for them. FLOPs come from XLA's cost analysis of the
compiled computation; peak memory from its memory analysis (arguments + outputs − donated aliases
+ temporaries: what the device holds while one call runs). Inputs are synthetic and already on the
devices, so this is the model alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax import sharding
from vit_jax.model import vit
from vit_jax.model.config import ViTConfig
from vit_jax.tools import cli
from vit_jax.train import step as train_step

MODES = ("train", "inference")
OPTIMIZERS = ("sgd", "adamw")


def parse_compiler_options(items: list[str]) -> dict[str, Any]:
    """`["xla_gpu_enable_triton_gemm=false", ...]` → XLA compile options for `Lowered.compile`
    (one compilation only, unlike XLA_FLAGS); values typed as XLA wants them: bool, int, float or
    string. Each option is checked against XLA by compiling a trivial program, before any model."""
    options: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"compiler option {item!r} is invalid: expected NAME=VALUE")
        options[name.strip()] = _typed(text.strip())
    if options:
        try:
            jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(options)
        except Exception as e:  # noqa: BLE001 - XLA's own message names the option
            raise ValueError(f"compiler options {items} are invalid: {e}") from None
    return options


def _typed(text: str) -> Any:
    if text.lower() in ("true", "false"):  # XLA_FLAGS' spelling of booleans
        return text.lower() == "true"
    return cli.parse_value(text)


@dataclasses.dataclass
class Runner:
    run: Callable[[int], None]
    compile_s: float  # lowering + compiling + the first call (what a user waits for)
    flops: float | None  # per call, XLA's count
    peak_bytes: int | None
    compile_only_s: float | None = None  # lowering + XLA compilation alone


def cost_flops(compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis (None when the backend does not report them)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def make_optimizer(name: str) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; allowed: {', '.join(OPTIMIZERS)}")
    # SGD + momentum is what the comparison with timm uses (the same update on both sides).
    return optax.sgd(1e-3, momentum=0.9) if name == "sgd" else optax.adamw(1e-4)


def synthetic_batch(config: ViTConfig, batch_size: int, mesh) -> dict[str, jax.Array]:
    """Random images in [-1, 1] and labels (never zeros: some kernels run faster on zeros)."""
    image_key, label_key = jax.random.split(jax.random.key(1))
    shape = (batch_size, *config.image_size, config.num_channels)
    images = jax.random.uniform(image_key, shape, jnp.float32, -1.0, 1.0)
    classes = max(config.num_classes, 1)
    labels = jax.nn.one_hot(jax.random.randint(label_key, (batch_size,), 0, classes), classes)
    return sharding.make_global_batch({"image": images, "label": labels}, mesh)


def build(
    config: ViTConfig,
    mode: str,
    batch_size: int,
    optimizer: str = "sgd",
    seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
) -> Runner:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    model = vit.VisionTransformer(config)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    sharding.check_batch_size(batch_size, mesh, "batch_size")
    params = vit.init_params(model, jax.random.key(seed))
    batch = synthetic_batch(config, batch_size, mesh)

    if mode == "train":
        tx = make_optimizer(optimizer)
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        shardings = sharding.tree_shardings(state, mesh, fsdp_min_size=2**60)
        state = jax.device_put(state, shardings)
        step = train_step.make_train_step(model, tx, mesh, shardings)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile(compiler_options)
        compile_only_s = time.perf_counter() - start
        holder: list[Any] = [state]

        def call():
            holder[0], metrics = compiled(holder[0], batch)
            return metrics["loss"]

    else:
        params = jax.device_put(params, sharding.replicated(mesh))
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        start = time.perf_counter()
        compiled = forward.lower(params, batch["image"]).compile(compiler_options)
        compile_only_s = time.perf_counter() - start

        def call():
            return compiled(params, batch["image"])

    jax.block_until_ready(call())  # the first call allocates; count it as start-up
    compile_s = time.perf_counter() - start

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = call()
        jax.block_until_ready(out)

    flops = cost_flops(compiled)  # of one device's share of the batch: the SPMD program
    flops = flops * mesh.size if flops else None
    return Runner(run, compile_s, flops, peak_bytes(compiled), compile_only_s)
