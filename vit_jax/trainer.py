"""`train_and_evaluate(config, workdir)`: the training loop, composed of the modules beside it.

  data        vit_jax.input_pipeline   per-process numpy batches (train: restartable at a step)
  devices     vit_jax.sharding         mesh, parameter placement, global batches + prefetch
  model       vit_jax.train_state      the ViTConfig, a fresh / fine-tuning / resumed state
  math        vit_jax.optim            optax optimizer and schedule
              vit_jax.train_step       loss, accumulated gradients, eval sums (jitted)
  storage     vit_jax.checkpoints      Orbax save / resume
  reporting   vit_jax.metrics          progress lines, TensorBoard, metrics.jsonl, curves.png

Restarting the same command resumes from the newest checkpoint and continues exactly as if never
stopped: the state (params, optimizer moments, step) is restored, the input pipeline restarts at
the saved step, and dropout keys are folded from the step.

Failures keep what was done: a non-finite loss stops the run with the step named, before any
checkpoint containing it is written; SIGTERM (preemption) saves a checkpoint and returns.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from vit_jax import checkpoints, metrics, models, optim, train_state, train_step
from vit_jax import sharding as sharding_lib


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def total_steps_of(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """config.total_steps, or config.total_epochs in steps (rounded up); exactly one must be set.

    None and 0 both mean unset, so a command line can switch from one to the other.
    """
    steps, epochs = config.get("total_steps") or None, config.get("total_epochs") or None
    if (steps is None) == (epochs is None):
        raise ValueError(
            f"set exactly one of config.total_steps ({steps}) and config.total_epochs ({epochs}); "
            f"0 or None unsets one, e.g. --config.total_steps=0 --config.total_epochs=10"
        )
    if steps is None:
        steps = math.ceil(epochs * num_train_examples / config.batch_size)
    if steps <= 0:
        raise ValueError(f"training length must be positive; got {steps} steps")
    return int(steps)


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh) -> None:
    if config.accum_steps < 1 or config.batch_size % config.accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a multiple of "
            f"config.accum_steps={config.accum_steps} (>= 1)"
        )
    sharding_lib.check_batch_size(config.batch_size, mesh)
    sharding_lib.check_batch_size(
        config.batch_size // config.accum_steps, mesh, "micro-batch (batch_size / accum_steps)"
    )
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")


def _get_datasets(config):
    from vit_jax import input_pipeline  # TensorFlow loads only when training needs data

    return input_pipeline.get_datasets(config)


class _PreemptionSignal:
    """Notices a preemption (SIGTERM) so the loop can checkpoint and stop between two steps.

    One process: our own SIGTERM handler sets a flag. Several processes: they must all stop at the
    same step, or the checkpoint's collectives would hang, so JAX's preemption sync service (which
    `jax.distributed.initialize` starts, and which catches SIGTERM itself) picks the step; without
    that service SIGTERM keeps its default effect and the newest checkpoint is where a rerun resumes.
    """

    def __init__(self):
        self.received = False
        self._previous = None
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def should_stop(self, step: int) -> bool:
        if not self._multihost:
            return self.received
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # no preemption service: SIGTERM just ends the processes
            return False

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(eval_step, params, data, mesh) -> dict[str, float]:
    """loss, top1 (and top5 with ≥ 5 classes) over the whole eval split, each example once."""
    totals = None
    for batch in sharding_lib.prefetch_to_device(data.eval_iter(), mesh):
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    if count == 0:
        raise ValueError("the eval split is empty")
    results = {"loss": totals["loss"] / count, "top1": totals["top1"] / count, "count": count}
    if data.num_classes >= 5:
        results["top5"] = totals["top5"] / count
    return {k: float(v) for k, v in results.items()}


def _format_eval(step: int, results: dict[str, float]) -> str:
    top5 = f" | top5 {100 * results['top5']:.2f}%" if "top5" in results else ""
    return (
        f"eval at step {step}: loss {results['loss']:.4f} | top1 {100 * results['top1']:.2f}%"
        f"{top5} ({int(results['count'])} examples)"
    )


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    if metrics.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


class _LossWatch:
    """Per-step losses kept on device until needed, so checking them never stalls the pipeline.

    `check()` fetches them all at once (at log, eval and checkpoint time) and raises at the first
    non-finite one, naming its step; since it runs before every save, no NaN state is ever saved.
    """

    def __init__(self, checkpoint_dir: epath.Path, latest_saved: int | None):
        self._pending: list[tuple[int, jax.Array]] = []
        self._since_last_log: list[float] = []
        self.history: dict[int, float] = {}
        self.checkpoint_dir = checkpoint_dir
        self.latest_saved = latest_saved

    def add(self, step: int, loss: jax.Array) -> None:
        self._pending.append((step, loss))

    def check(self) -> None:
        """Fetches the pending losses; raises at the first non-finite one."""
        steps = [s for s, _ in self._pending]
        values = [float(v) for v in jax.device_get([v for _, v in self._pending])]
        self._pending = []
        for step, value in zip(steps, values):
            if not np.isfinite(value):
                kept = (
                    f"the last good checkpoint is step {self.latest_saved} in {self.checkpoint_dir}"
                    if self.latest_saved is not None
                    else "no checkpoint had been saved yet"
                )
                raise NonFiniteLossError(
                    f"loss is {value} at step {step}; training stopped and nothing was saved after "
                    f"it ({kept}). Lower config.optim.learning_rate, add warmup "
                    f"(config.schedule.warmup_steps) or clipping (config.optim.grad_clip_norm)."
                )
            self.history[step] = value
            self._since_last_log.append(value)

    def mean_since_last_log(self) -> float:
        self.check()
        mean = float(np.mean(self._since_last_log))
        self._since_last_log = []
        return mean


def _initial_state(config, ckpt, model, tx, shapes, shardings) -> tuple[dict, int]:
    """(state, step): the newest checkpoint's if there is one, else step 0 from init_from/random."""
    if ckpt.latest_step() is None:
        params = None
        if config.init_from:
            params = train_state.load_init_params(config.init_from, model.config)
            metrics.log(f"Initialized from {config.init_from}")
        rng = jax.random.key(config.seed)
        return train_state.init_state(model, tx, shardings, rng, params), 0
    state, data_state = ckpt.restore(checkpoints.abstract_with_shardings(shapes, shardings))
    step = int(data_state["step"])
    if int(jax.device_get(state["step"])) != step:
        raise ValueError(
            f"checkpoint {step} in {ckpt.directory} is inconsistent: its train state is at step "
            f"{int(jax.device_get(state['step']))}"
        )
    metrics.log(f"Resuming from the checkpoint of step {step} in {ckpt.directory}")
    return state, step


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Any = None
) -> dict[str, Any]:
    """Train (or resume) as `config` says, evaluate, and write everything to `workdir`.

    `data` is what `input_pipeline.get_datasets(config)` returns (None: exactly that), or anything
    with its contract: `num_classes`, `num_train_examples`, `image_shape`, a restartable
    `train_iter(start_step)` and a padded, masked `eval_iter()` (tests pass in-memory data).

    Returns {'step': final step, 'eval': final eval metrics, 'train_losses': {step: loss} of the
    steps this call ran, 'preempted': bool}.
    """
    workdir = checkpoints.absolute_path(workdir)
    mesh = sharding_lib.make_mesh(config.mesh)
    _check_batch_sizes(config, mesh)
    data = _get_datasets(config) if data is None else data
    total_steps = total_steps_of(config, data.num_train_examples)
    model_config = train_state.model_config_for(
        config, data.num_classes, num_channels=data.image_shape[-1]
    )
    model = models.VisionTransformer(model_config)
    _write_config(config, workdir)

    tx, lr_schedule = optim.make_optimizer(
        config.optim, config.schedule, models.param_shapes(model), total_steps
    )
    shapes = train_state.state_shapes(model, tx)
    shardings = train_state.state_shardings(shapes, mesh, config.fsdp_min_size)

    ckpt = checkpoints.TrainCheckpoints(
        workdir / "checkpoints", keep=config.keep_checkpoints, async_save=config.async_checkpoints
    )
    state, start_step = _initial_state(config, ckpt, model, tx, shapes, shardings)
    metrics.log(
        f"Model: {models.count_params(shapes['params']):,} parameters | mesh {dict(mesh.shape)} | "
        f"{total_steps} steps of {config.batch_size} examples "
        f"({config.accum_steps} micro-batches each)"
    )

    step_fn = train_step.make_train_step(
        model,
        tx,
        mesh,
        shardings,
        accum_steps=config.accum_steps,
        seed=config.seed,
        loss=config.loss,
    )
    eval_fn = train_step.make_eval_step(model, mesh, shardings["params"], loss=config.loss)
    writer = metrics.MetricWriter(workdir)
    progress = metrics.Progress(total_steps, config.batch_size, start_step)
    losses = _LossWatch(ckpt.directory, ckpt.latest_step())
    # The step is what restarts the input pipeline; the rest is there for a person reading it.
    data_state = {
        "dataset": str(config.dataset),
        "batch_size": config.batch_size,
        "seed": config.seed,
    }

    def save(step):
        losses.check()  # never write a state that a NaN has reached
        with progress.paused():
            ckpt.save(step, state, model_config, {**data_state, "step": step})
        losses.latest_saved = step

    def run_eval(step):
        nonlocal last_eval_step
        losses.check()  # a NaN model is not worth evaluating
        last_eval_step = step
        with progress.paused():
            results = evaluate(eval_fn, state["params"], data, mesh)
        writer.write(step, "eval", results)
        metrics.log(_format_eval(step, results))
        return results

    eval_results, last_eval_step, preempted, step = None, None, False, start_step
    batches = sharding_lib.prefetch_to_device(
        data.train_iter(start_step=start_step), mesh, config.prefetch_to_device
    )
    try:
        with _PreemptionSignal() as preemption:
            while step < total_steps:
                state, step_metrics = step_fn(state, next(batches))
                step += 1
                losses.add(step, step_metrics["loss"])
                if step == total_steps or (
                    config.log_every_steps and step % config.log_every_steps == 0
                ):
                    scalars = {
                        "loss": losses.mean_since_last_log(),
                        "grad_norm": float(step_metrics["grad_norm"]),
                        "lr": float(lr_schedule(step - 1)),
                    }
                    line, throughput = progress.line(step, scalars)
                    metrics.log(line)
                    writer.write(step, "train", {**scalars, **throughput})
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    eval_results = run_eval(step)
                if preemption.should_stop(step):
                    metrics.log(f"Preempted (SIGTERM) at step {step}: saving a checkpoint")
                    save(step)
                    preempted = True
                    break
                if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                    save(step)
            if not preempted:
                if ckpt.latest_step() != step:
                    save(step)
                if last_eval_step != step:
                    eval_results = run_eval(step)
        losses.check()
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()

    if not preempted:
        metrics.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
        metrics.log(
            f"Final {config.eval_split} accuracy: {100 * eval_results['top1']:.2f}% "
            f"({int(eval_results['count'])} examples)"
        )
    return {
        "step": step,
        "eval": eval_results,
        "train_losses": dict(losses.history),
        "preempted": preempted,
    }
