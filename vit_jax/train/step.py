"""The loss, one optimizer step (with gradient accumulation) and one eval step, jitted over a mesh.

The train state is a plain dict {'params', 'opt_state', 'step'} (the checkpoint's `state` item),
plus 'ema_params' (an exponential moving average of the params) when `config.ema_decay` > 0.
Both steps are compiled once with explicit input/output shardings, so the same code runs on one CPU,
8 simulated devices, a GPU box or a TPU pod: the mesh decides where every array lives and XLA adds
the collectives (gradient all-reduce for 'data', all-gather / reduce-scatter for 'fsdp').
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax import sharding as sharding_lib
from vit_jax.model.vit import VisionTransformer
from vit_jax.train import distill as distill_lib
from vit_jax.train import evaluation


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy against (possibly soft: smoothed, mixed-up) targets."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example sum over classes of independent binary cross-entropies (big_vision's i21k loss).

    With many classes this is the loss to pair with a head bias of -10: every class starts near
    probability 0 instead of the softmax's shift-invariant 1/K.
    """
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(losses, axis=-1)


LOSSES = {"softmax_xent": cross_entropy, "sigmoid_xent": sigmoid_cross_entropy}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if name not in LOSSES:
        raise ValueError(f"config.loss={name!r} is not supported; allowed: {list(LOSSES)}")
    return LOSSES[name]


def split_micro_batches(x: jax.Array, accum_steps: int, mesh: Mesh) -> jax.Array:
    """(B, ...) → (accum_steps, B / accum_steps, ...), each micro-batch spread over all devices.

    Example r goes to micro-batch r % accum_steps. Taking strided (not contiguous) rows matters: the
    batch is sharded in contiguous blocks, so contiguous micro-batches would each sit on only a
    fraction of the devices; strided ones keep every device busy in every micro-step.
    """
    micro = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    spec = PartitionSpec(None, sharding_lib.BATCH_AXES)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, spec))


def make_train_step(
    model: VisionTransformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    **step_options: Any,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted; `state` is donated.

    See `train_step_fn` for what one step does and its `step_options` (accum_steps, seed, loss).
    The trainer runs `make_multi_step`'s program instead: the same step, but compiled as a loop
    body, which rounds differently in the last bits (see there).
    """
    if step_options.get("teacher") is not None:
        raise ValueError("make_train_step does not distill; use make_multi_step (the trainer's)")
    step = train_step_fn(model, tx, mesh, **step_options)
    return _jit_step(step, state_shardings, sharding_lib.batch_sharding(mesh), mesh)


def make_multi_step(
    model: VisionTransformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: Any,
    **step_options: Any,
) -> Callable[[dict, dict, Any], tuple[dict, dict]]:
    """`multi_step(state, batches, n) -> (state, metrics)`: the train steps of the first `n` of K
    stacked batches, in one dispatch. The trainer runs every step of a run through it.

    `batches` holds K batches stacked on a leading axis (`sharding.stacked_batch_sharding`); `n`
    (1 <= n <= K) is a runtime value. Each metric comes back with that leading K axis (entries
    n.. are zeros). One host→device dispatch instead of n: what a small model needs when the
    per-step host overhead dominates. `step_options`: as for `make_train_step`.

    Why every grouping gives the same bits: the steps run in a `lax.fori_loop` whose trip count is
    `n`, unknown when XLA compiles. So XLA can neither drop the loop for n = 1 (a length-1 loop is
    inlined into its caller and fused with what surrounds it) nor unroll or specialize it for a
    known length: the body is compiled once, as a computation of its own, and step s runs that
    same code on the same input bits (the state between dispatches is the same f32 buffers)
    whichever dispatch it lands in. A run's numbers then depend neither on where the log / eval /
    checkpoint steps cut the groups, nor on where it was stopped and resumed, nor on K. What did
    differ before is a step compiled as a program of its own (`make_train_step`): XLA fuses and
    orders its float ops otherwise than in a loop body. Measured on 2 CPU devices, digits recipe:
    that program vs this loop (or a `lax.scan` of 8, which equals it) differ by 2.9e-5 (max abs
    param) after 40 steps, 8.7e-3 after 300 (issue 24); through this loop, K = 1 or 8 with
    checkpoints every 0 / 5 / 7 steps and logs every 1 / 50 give identical params (0.0).
    (tests/test_harmless_fields.py and tests/test_stop_signals.py check it.)
    """
    step = train_step_fn(model, tx, mesh, **step_options)
    teacher = step_options.get("teacher")

    def multi_step(state, batches, n, teacher_params):
        size = jax.tree.leaves(batches)[0].shape[0]
        first = jax.tree.map(lambda x: x[0], batches)
        shapes = jax.eval_shape(step, state, first, teacher_params)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((size, *s.shape), s.dtype), shapes)

        def body(i, carry):
            state, metrics = carry
            batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), batches)
            state, out = step(state, batch, teacher_params)
            metrics = jax.tree.map(
                lambda m, v: jax.lax.dynamic_update_index_in_dim(m, v, i, 0), metrics, out
            )
            return state, metrics

        return jax.lax.fori_loop(0, n, body, (state, metrics))

    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        multi_step,
        in_shardings=(
            state_shardings,
            sharding_lib.stacked_batch_sharding(mesh),
            replicated,
            teacher.shardings if teacher is not None else None,
        ),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),  # the state only: the teacher's params are read by every call
    )
    counts: dict[int, jax.Array] = {}  # n as a global array (the same on every process), made once
    teacher_params = teacher.params if teacher is not None else None
    program = jitted  # compiled on first call, or ahead of it by `compile_for`

    def count(n: int) -> jax.Array:
        if n not in counts:
            counts[n] = jax.make_array_from_callback((), replicated, lambda _: np.int32(n))
        return counts[n]

    def run(state, batches, n: int):
        return program(state, batches, count(n), teacher_params)

    def compile_for(state, batches) -> None:
        """Compiles the program for these shapes now; later calls run it. The trainer does this
        before the processes meet at the first step, so they start it together: XLA's CPU
        collectives (gloo) fail a process that waits over 30 s for the others to join a new
        collective, and compiling on a loaded host can take longer than that."""
        nonlocal program
        program = jitted.lower(state, batches, count(1), teacher_params).compile()

    run.compile_for = compile_for
    return run


def _jit_step(step, state_shardings, batch_sharding, mesh: Mesh):
    """Jitted with the state laid out as `state_shardings` (donated) and metrics replicated."""
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def train_step_fn(
    model: VisionTransformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    accum_steps: int = 1,
    seed: int = 0,
    loss: str = "softmax_xent",
    ema_decay: float = 0.0,
    teacher: distill_lib.Teacher | None = None,
    student_preprocessing: Any = None,
) -> Callable[..., tuple[dict, dict]]:
    """The (un-jitted) step `(state, batch) -> (state, metrics)`.

    `batch` = {'image' (B, H, W, C), 'label' (B, K) targets}. The step averages the gradients of
    `accum_steps` micro-batches (a `lax.scan`, so memory is that of one micro-batch) and equals one
    step on the whole batch. Dropout/drop-path keys are `fold_in(key(seed), step)` (and the
    micro-batch index), so a resumed run draws exactly the masks the uninterrupted one would, on
    any number of devices (JAX's partitionable threefry makes random bits independent of sharding).
    metrics: 'loss' (mean over the batch) and 'grad_norm' (global, before clipping).
    `ema_decay` > 0: the state also holds 'ema_params', updated after each step (`update_ema`).
    `teacher` (a `distill.Teacher`): the loss is `distill.per_example_loss` against the teacher's
    logits of the same (micro-)batch, converted from `student_preprocessing` (the student's input
    convention) to the teacher's; the step then takes the teacher's params as a third argument,
    under `stop_gradient` (only the student's params are differentiated). A student with a
    distillation token gives (class head, distillation head) logits to it.
    """
    # A stream of its own: `key(seed)` itself initializes the parameters.
    base_key = jax.random.fold_in(jax.random.key(seed), 1)
    per_example_loss = get_loss(loss)

    def loss_fn(params, images, targets, rng, teacher_params=None):
        if teacher is None:
            logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
            return per_example_loss(logits, targets).mean()
        return distilled_loss(params, images, targets, rng, teacher_params)

    def distilled_loss(params, images, targets, rng, teacher_params):
        if model.config.distillation_token:
            _, aux = model.apply(
                {"params": params},
                images,
                train=True,
                rngs={"dropout": rng},
                return_intermediates=True,
            )
            heads = aux["head_logits"]
        else:
            heads = (model.apply({"params": params}, images, train=True, rngs={"dropout": rng}),)
        teacher_logits = teacher.logits(teacher_params, images, student_preprocessing)
        losses = distill_lib.per_example_loss(
            heads,
            targets,
            teacher_logits,
            kind=teacher.kind,
            temperature=teacher.temperature,
            weight=teacher.weight,
            label_loss=per_example_loss,
        )
        return losses.mean()

    grad_fn = jax.value_and_grad(loss_fn)  # w.r.t. the student's params only

    def train_step(state, batch, teacher_params=None):
        params = state["params"]
        rng = jax.random.fold_in(base_key, state["step"])
        if accum_steps == 1:
            loss, grads = grad_fn(params, batch["image"], batch["label"], rng, teacher_params)
        else:
            micro = {
                k: split_micro_batches(batch[k], accum_steps, mesh) for k in ("image", "label")
            }

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                loss, grads = grad_fn(
                    params,
                    micro_batch["image"],
                    micro_batch["label"],
                    jax.random.fold_in(rng, index),
                    teacher_params,
                )
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
            loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        if ema_decay:
            new_state["ema_params"] = update_ema(
                state["ema_params"], new_state["params"], state["step"], ema_decay
            )
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay of the update made by step `step` (0-based: the state's step before it).

    TensorFlow's `tf.train.ExponentialMovingAverage(decay, num_updates=step)` warm-up,
    `min(decay, (1 + step) / (10 + step))`: 0.1 at the first step, so the average forgets the
    random init within tens of steps instead of 1 / (1 - decay) of them.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """`d * ema + (1 - d) * params` per leaf with `d = ema_decay_at(step, decay)`, in float32."""
    d = ema_decay_at(step, decay)

    def mix(ema, new):
        mixed = d * ema.astype(jnp.float32) + (1.0 - d) * new.astype(jnp.float32)
        return mixed.astype(ema.dtype)

    return jax.tree.map(mix, ema_params, params)


def make_eval_step(
    model: VisionTransformer,
    mesh: Mesh,
    params_shardings: Any,
    loss: str = "softmax_xent",
    metrics: Iterable[str] = tuple(evaluation.METRICS),
) -> Callable[[dict, dict], dict]:
    """`eval_step(params, batch) -> sums`, jitted. Padded examples (mask 0) count for nothing.

    Returns sums, not means, so batches add up and the caller divides once by the number of real
    examples: 'loss', each of `metrics` (names in `evaluation.METRICS`) and 'count'.
    """
    per_example_loss = get_loss(loss)
    chosen = evaluation.get_metrics(metrics)

    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        mask = batch["mask"].astype(jnp.float32)
        labels = jnp.argmax(batch["label"], axis=-1)
        sums = {"loss": jnp.sum(per_example_loss(logits, batch["label"]) * mask)}
        for name, metric in chosen.items():
            sums[name] = jnp.sum(metric.per_example(logits, labels) * mask)
        return {**sums, "count": jnp.sum(mask)}

    return jax.jit(
        eval_step,
        in_shardings=(params_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=sharding_lib.replicated(mesh),
    )
