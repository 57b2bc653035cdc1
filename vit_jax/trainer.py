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
checkpoint containing it is written; SIGTERM (preemption) and Ctrl-C save a checkpoint and return
(`vit_jax.stops`); a damaged newest checkpoint is skipped for the previous one (`checkpoints`); a
start that is refused (bad config, workdir of another run or in use) changes nothing in the
workdir (`vit_jax.workdir`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vit_jax import (
    checkpoints,
    config_checks,
    dispatch,
    distributed,
    metrics,
    models,
    optim,
    preprocessing,
    stops,
    train_state,
    train_step,
)
from vit_jax import progress as progress_bars
from vit_jax import sharding as sharding_lib
from vit_jax import workdir as workdir_lib


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the newest saved checkpoint."""


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


def evaluate(eval_step, params, data, mesh) -> dict[str, float]:
    """loss, top1 (and top5 with ≥ 5 classes) over the whole eval split, each example once."""
    totals = None
    with progress_bars.bar(getattr(data, "num_eval_batches", None), "eval", unit="batch") as bar:
        for batch in sharding_lib.prefetch_to_device(data.eval_iter(), mesh):
            sums = eval_step(params, batch)
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
            bar.update(1)
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
        """The loss of `step`, or the (K,) losses of steps `step`..`step`+K-1 (one dispatch)."""
        self._pending.append((step, loss))

    def check(self) -> None:
        """Fetches the pending losses; raises at the first non-finite one."""
        fetched = jax.device_get([v for _, v in self._pending])
        steps, values = [], []
        for (first, _), value in zip(self._pending, fetched):
            value = np.atleast_1d(np.asarray(value, np.float64))
            steps.extend(range(first, first + value.size))
            values.extend(float(v) for v in value)
        self._pending = []
        for step, value in zip(steps, values):
            if not np.isfinite(value):
                kept = (
                    f"the newest checkpoint is step {self.latest_saved} in {self.checkpoint_dir}"
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
    restored = ckpt.restore_newest_intact(
        checkpoints.abstract_with_shardings(shapes, shardings), warn=metrics.log
    )
    if restored is None:
        params = None
        if config.init_from:
            params = train_state.load_init_params(config.init_from, model.config)
            metrics.log(f"Initialized from {config.init_from}")
        rng = jax.random.key(config.seed)
        return train_state.init_state(model, tx, shardings, rng, params), 0
    state, data_state = restored
    step = int(data_state["step"])
    _warn_on_topology_change(data_state)
    if int(jax.device_get(state["step"])) != step:
        raise ValueError(
            f"checkpoint {step} in {ckpt.directory} is inconsistent: its train state is at step "
            f"{int(jax.device_get(state['step']))}"
        )
    metrics.log(f"Resuming from the checkpoint of step {step} in {ckpt.directory}")
    return state, step


def _log_sharding(shapes, shardings, mesh) -> None:
    """What FSDP did, in one line; `mesh.fsdp > 1` that shards nothing is worth a warning."""
    from vit_jax import sharding_rules

    specs = jax.tree.map(lambda s: s.spec, shardings)
    line, any_sharded = sharding_rules.describe(shapes, specs, dict(mesh.shape))
    metrics.log(line)
    if mesh.shape["fsdp"] > 1 and not any_sharded:
        message = (
            f"mesh.fsdp={mesh.shape['fsdp']} but no parameter is sharded: every one is smaller "
            f"than config.fsdp_min_size or matched a 'replicate' rule, so the 'fsdp' devices "
            f"only split the batch. Lower config.fsdp_min_size to shard this model."
        )
        logging.warning(message)
        metrics.log(f"WARNING {message}")


def _warn_on_topology_change(data_state: dict) -> None:
    """A checkpoint from another process count continues exactly only with random-access data."""
    saved = data_state.get("process_count")
    if saved is None or saved == jax.process_count():
        return
    if data_state.get("order") == "global":
        metrics.log(
            f"Resuming a {saved}-process checkpoint on {jax.process_count()} process(es): the "
            f"data order is global, so training continues exactly as it would have"
        )
    else:
        logging.warning(
            "Resuming a %s-process checkpoint on %d process(es) with per-process data order "
            "(the train split is streamed, not read at random): the examples seen from here on "
            "differ from an uninterrupted run (some repeated, some skipped in this epoch).",
            saved,
            jax.process_count(),
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Any = None, *, restart: bool = False
) -> dict[str, Any]:
    """Train (or resume) as `config` says, evaluate, and write everything to `workdir`.

    `data` is what `input_pipeline.get_datasets(config)` returns (None: exactly that), or anything
    with its contract: `num_classes`, `num_train_examples`, `image_shape`, a restartable
    `train_iter(start_step)` and a padded, masked `eval_iter()` (tests pass in-memory data).
    `restart`: start over in a workdir that holds another run (moved to `previous-<n>/`).
    Returns {'step': final step, 'eval': final eval metrics, 'train_losses': {step: loss} of the
    steps this call ran, 'preempted': bool, 'stopped_by': 'SIGTERM' | 'SIGINT' | None}.
    """
    workdir = checkpoints.absolute_path(workdir)
    distributed.check_same_config(config)  # first: a differing config could fail on one only
    config_checks.validate_training(config)
    mesh = sharding_lib.make_mesh(config.mesh)
    metrics.log(distributed.describe(mesh))
    _check_batch_sizes(config, mesh)
    owner = workdir_lib.Workdir(
        str(workdir), restart=restart, main_process=metrics.is_main_process()
    )
    owner.check_writable()
    owner.check_not_in_use()
    data = _get_datasets(config) if data is None else data
    distributed.check_shared_workdir(workdir)
    total_steps = total_steps_of(config, data.num_train_examples)
    model_config = train_state.model_config_for(
        config, data.num_classes, num_channels=data.image_shape[-1]
    )
    model = models.VisionTransformer(model_config)
    device_data = None
    if config.get("data_on_device"):  # checked (and placed) before anything is claimed
        from vit_jax.data import on_device

        device_data = on_device.from_data(data, config, mesh)
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    owner.check_config(config_json, total_steps, data.num_train_examples)

    tx, lr_schedule = optim.make_optimizer(
        config.optim, config.schedule, models.param_shapes(model), total_steps
    )
    shapes = train_state.state_shapes(model, tx)
    shardings = train_state.state_shardings(
        shapes, mesh, config.fsdp_min_size, config.get("sharding_rules", ())
    )
    _log_sharding(shapes, shardings, mesh)

    owner.claim()
    try:
        if owner.moved_to:
            metrics.log(f"--restart: the previous run in {workdir} was moved to {owner.moved_to}")
        ckpt = checkpoints.TrainCheckpoints(
            workdir / "checkpoints",
            keep=config.keep_checkpoints,
            async_save=config.async_checkpoints,
        )
        state, start_step = _initial_state(config, ckpt, model, tx, shapes, shardings)
        owner.commit(config_json)  # only now: every check that can refuse the start has passed
    except BaseException:
        owner.abandon()
        raise
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
    steps_per_dispatch = config.get("steps_per_dispatch", 1)
    multi_step_fn = None
    if steps_per_dispatch > 1:
        multi_step_fn = train_step.make_multi_step(
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
        # "global": the same batches on any topology (data objects without it: unknown)
        "order": "global" if device_data else getattr(data, "order", None),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }

    # The input convention travels with the model, so predict/convert apply it without being told.
    input_convention = preprocessing.for_training(config.dataset, data.image_shape[-1]).to_dict()

    def save(step):
        losses.check()  # never write a state that a NaN has reached
        with progress.paused():
            ckpt.save(step, state, model_config, {**data_state, "step": step}, input_convention)
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
    distributed.barrier("train loop")  # start the first step (and its compile) together
    # K steps per dispatch between the steps where the loop looks at the state (vit_jax.dispatch).
    boundaries = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
    sizes = dispatch.plan(start_step, total_steps, steps_per_dispatch, boundaries)
    if device_data is not None:
        batches = device_data.batches(start_step, sizes)
    else:
        batches = dispatch.to_devices(
            dispatch.grouped(data.train_iter(start_step=start_step), sizes),
            mesh,
            config.prefetch_to_device,
        )
    try:
        with (
            stops.StopSignals() as stop,
            progress_bars.bar(total_steps, "train", start_step) as bar,
        ):
            while step < total_steps:
                size, batch = next(batches)
                if size == 1:
                    state, step_metrics = step_fn(state, batch)
                else:
                    state, step_metrics = multi_step_fn(state, batch)
                losses.add(step + 1, step_metrics["loss"])
                step += size
                bar.update(size)
                ckpt.check_for_errors()  # a failed background save ends the run now
                if step == total_steps or (
                    config.log_every_steps and step % config.log_every_steps == 0
                ):
                    scalars = {
                        "loss": losses.mean_since_last_log(),
                        "grad_norm": float(np.asarray(step_metrics["grad_norm"]).reshape(-1)[-1]),
                        "lr": float(lr_schedule(step - 1)),
                    }
                    line, throughput = progress.line(step, scalars)
                    metrics.log(line)
                    writer.write(step, "train", {**scalars, **throughput})
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    eval_results = run_eval(step)
                if stop.should_stop(step):  # SIGTERM / Ctrl-C: the step is done; save it
                    if jax.process_count() > 1:  # every process says where it stopped
                        logging.warning("Process %d stops at step %d", jax.process_index(), step)
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
        try:
            ckpt.wait()
        finally:
            ckpt.close()
            writer.close()
            owner.release()

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
        "stopped_by": stop.received if preempted else None,
        "checkpoint_dir": str(ckpt.directory),
    }
