"""`train_and_evaluate(config, workdir)`: the training loop, composed of the modules beside it.

  data        vit_jax.data.pipeline   per-process numpy batches (train: restartable at a step)
  devices     vit_jax.sharding         mesh, parameter placement, global batches + prefetch
  model       vit_jax.train.state      the ViTConfig, a fresh / fine-tuning / resumed state
  math        vit_jax.train.optim            optax optimizer and schedule
              vit_jax.train.step       loss, accumulated gradients, eval sums (jitted)
  checks      vit_jax.train.checks    training fields, run length, batch sizes vs the mesh
  teacher     vit_jax.train.distill   knowledge distillation: the frozen teacher and the losses
  evaluation  vit_jax.train.evaluation       the eval metrics (METRICS) and one pass over the eval split
  watching    vit_jax.train.loss_watch       NaN/inf losses stop the run, fetched without stalling
  storage     vit_jax.checkpoints      Orbax save / resume
  reporting   vit_jax.train.report          progress lines, TensorBoard, metrics.jsonl, curves.png

Restarting the same command resumes from the newest checkpoint and continues exactly as if never
stopped: the state (params, optimizer moments, step, and the EMA weights with `config.ema_decay`)
is restored, the input pipeline restarts at the saved step, and dropout keys are folded from the
step.

Failures keep what was done: a non-finite loss stops the run with the step named, before any
checkpoint containing it is written; SIGTERM (preemption) and Ctrl-C save a checkpoint and return
(`vit_jax.train.stops`); a damaged newest checkpoint is skipped for the previous one (`checkpoints`); a
start that is refused (bad config, workdir of another run or in use) changes nothing in the
workdir (`vit_jax.train.workdir`).
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vit_jax import checkpoints, distributed, progress
from vit_jax.interop import input_convention
from vit_jax.model import vit
from vit_jax.train import (
    checks,
    dispatch,
    distill,
    evaluation,
    fewshot_loop,
    loss_watch,
    plan,
    report,
    stops,
)
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step
from vit_jax.train.workdir import Workdir


def _close_storage(ckpt, writer, owner, aborted: bool, interrupted: bool) -> None:
    """Waits for the last save, then closes. After a second Ctrl-C (before or during the wait) the
    checkpoint manager is left unclosed: closing it would complete the save the user aborted.
    `interrupted`: a KeyboardInterrupt ended the loop (it may have landed inside a library)."""
    try:
        if not aborted:
            try:
                ckpt.wait()
            except stops.Aborted:
                aborted = interrupted = True
                raise
            finally:
                if not aborted:
                    ckpt.close()
    finally:
        writer.close(interrupted=interrupted)
        owner.release()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, data: Any = None, *, restart: bool = False
) -> dict[str, Any]:
    """Train (or resume) as `config` says, evaluate, and write everything to `workdir`.

    `data` is what `pipeline.get_datasets(config)` returns (None: exactly that), or anything
    with its contract: `num_classes`, `num_train_examples`, `image_shape`, a restartable
    `train_iter(start_step)` and a padded, masked `eval_iter()` (tests pass in-memory data).
    `restart`: start over in a workdir that holds another run (moved to `previous-<n>/`).
    Returns {'step': final step, 'eval': final eval metrics, 'train_losses': {step: loss} of the
    steps this call ran, 'preempted': bool, 'stopped_by': 'SIGTERM' | 'SIGINT' | None}.
    """
    workdir = checkpoints.absolute_path(workdir)
    distributed.check_same_config(config)  # first: a differing config could fail on one only
    owner = Workdir(str(workdir), restart=restart, main_process=progress.is_main_process())

    def check_workdir(mesh):  # before the dataset is opened (which may download it)
        progress.log(distributed.describe(mesh))
        checks.check_workdir_apart_from_data(str(workdir), config)
        owner.check_writable()
        owner.check_not_in_use()

    run = plan.plan_run(config, data, before_data=check_workdir)
    data, mesh, model, total_steps = run.data, run.mesh, run.model, run.total_steps
    tx, shapes, shardings = run.tx, run.shapes, run.shardings
    distributed.check_shared_workdir(workdir)
    device_data = None
    if config.get("data_on_device"):  # checked (and placed) before anything is claimed
        from vit_jax.data import on_device

        device_data = on_device.from_data(data, config, mesh)
    config_json = config.to_json_best_effort(indent=2, sort_keys=True)
    owner.check_config(config_json, total_steps, data.num_train_examples)
    train_state.log_sharding(shapes, shardings, mesh)
    # Reads the few-shot splits and checks the shots against their classes, before any claim.
    fewshot_runner = fewshot_loop.prepare(config, model, mesh, shardings["params"])

    # Process 0 locks the workdir (and with --restart moves the old run aside); the others must not
    # look at its checkpoints before that is done.
    distributed.on_process_0("claiming the workdir", owner.claim)
    try:
        if owner.moved_to:
            progress.log(f"--restart: the previous run in {workdir} was moved to {owner.moved_to}")
        ckpt = checkpoints.TrainCheckpoints(
            workdir / "checkpoints",
            keep=config.keep_checkpoints,
            async_save=config.async_checkpoints,
        )
        state, start_step = train_state.initial_state(config, ckpt, model, tx, shapes, shardings)
        owner.commit(config_json)  # only now: every check that can refuse the start has passed
    except BaseException:
        owner.abandon()
        raise
    progress.log(
        f"Model: {vit.count_params(shapes['params']):,} parameters | mesh {dict(mesh.shape)} | "
        f"{total_steps} steps of {config.batch_size} examples "
        f"({config.accum_steps} micro-batches each)"
    )

    step_options = dict(accum_steps=config.accum_steps, seed=config.seed, loss=config.loss)
    step_options["ema_decay"] = config.get("ema_decay", 0.0)
    # The input convention travels with the model, so predict/convert apply it without being told.
    preprocessing = input_convention.for_training(config.dataset, data.image_shape[-1])
    if run.teacher is not None:  # frozen, an argument of the step of its own (distill.py)
        step_options.update(teacher=run.teacher, student_preprocessing=preprocessing)
        progress.log(distill.cost_line(run.teacher, model, config.batch_size))
    # Every step runs through this one program, whatever the grouping (dispatch.py says why).
    steps_fn = train_step.make_multi_step(model, tx, mesh, shardings, **step_options)
    steps_per_dispatch = config.get("steps_per_dispatch", 1)
    eval_fn = train_step.make_eval_step(model, mesh, shardings["params"], loss=config.loss)
    writer = report.MetricWriter(workdir)
    meter = report.Progress(total_steps, config.batch_size, start_step)
    losses = loss_watch.LossWatch(ckpt.directory, ckpt.latest_step())
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

    convention = preprocessing.to_dict()

    def save(step):
        losses.check()  # never write a state that a NaN has reached
        with meter.paused():
            ckpt.save(step, state, model.config, {**data_state, "step": step}, convention)
        losses.latest_saved = step

    def run_eval(step):
        nonlocal last_eval_step, ema_results
        losses.check()  # a NaN model is not worth evaluating
        last_eval_step = step
        with meter.paused():
            results = evaluation.evaluate(eval_fn, state["params"], data, mesh)
            if "ema_params" in state:  # the EMA weights beside the raw ones, as split 'eval_ema'
                ema_results = evaluation.evaluate(eval_fn, state["ema_params"], data, mesh)
        writer.write(step, "eval", results)
        if ema_results is not None:
            writer.write(step, "eval_ema", ema_results)
        progress.log(evaluation.format_eval(step, results, ema=ema_results))
        return results

    def run_fewshot(step):
        nonlocal last_fewshot_step
        losses.check()
        last_fewshot_step = step
        with meter.paused():
            results, parts = fewshot_runner.evaluate(state["params"])
        writer.write(step, "fewshot", results)
        progress.log(fewshot_loop.format_fewshot(step, parts, fewshot_runner.seeds))

    eval_results, last_eval_step, preempted, step = None, None, False, start_step
    ema_results, last_fewshot_step = None, None
    fewshot_every = fewshot_runner.every_steps if fewshot_runner else 0
    # K steps per dispatch between the steps where the loop looks at the state (vit_jax.train.dispatch).
    boundaries = (
        config.log_every_steps,
        config.eval_every_steps,
        config.checkpoint_every_steps,
        fewshot_every,
    )
    sizes = dispatch.plan(start_step, total_steps, steps_per_dispatch, boundaries)
    if device_data is not None:
        batches = device_data.batches(start_step, sizes, steps_per_dispatch)
    else:
        batches = dispatch.to_devices(
            dispatch.grouped(data.train_iter(start_step=start_step), sizes, steps_per_dispatch),
            mesh,
            config.prefetch_to_device,
        )
    stop, aborted, interrupted = stops.StopSignals(), False, False
    try:
        if step < total_steps:  # compiled before the processes meet: they start the step together
            first = next(batches)
            steps_fn.compile_for(state, first[1])
            batches = itertools.chain([first], batches)
        distributed.barrier("train loop")
        with (
            stop,
            progress.bar(total_steps, "train", start_step) as bar,
        ):
            while step < total_steps:
                size, batch = next(batches)
                state, step_metrics = steps_fn(state, batch, size)
                losses.add(step + 1, step_metrics["loss"], size)
                step += size
                bar.update(size)
                ckpt.check_for_errors()  # a failed background save ends the run now
                if step == total_steps or (
                    config.log_every_steps and step % config.log_every_steps == 0
                ):
                    scalars = {
                        "loss": losses.mean_since_last_log(),
                        "grad_norm": float(np.asarray(step_metrics["grad_norm"])[size - 1]),
                        "lr": float(run.lr_schedule(step - 1)),
                    }
                    line, throughput = meter.line(step, scalars)
                    progress.log(line)
                    writer.write(step, "train", {**scalars, **throughput})
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    eval_results = run_eval(step)
                if fewshot_every and step % fewshot_every == 0:
                    run_fewshot(step)
                if stop.should_stop(step, size):  # SIGTERM / Ctrl-C: the step is done; save it
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
                if fewshot_runner and last_fewshot_step != step:
                    run_fewshot(step)
        losses.check()
    except KeyboardInterrupt as e:
        aborted, interrupted = isinstance(e, stops.Aborted), True
        raise
    finally:
        try:
            _close_storage(ckpt, writer, owner, aborted, interrupted)
        finally:
            stop.clean_up_done()

    if not preempted:
        report.plot_curves(workdir / "metrics.jsonl", workdir / "curves.png")
        progress.log(meter.summary())
        progress.log(
            f"Final {config.eval_split} accuracy: {100 * eval_results['top1']:.2f}% "
            f"({int(eval_results['count'])} examples)"
            + (f"; EMA weights: {100 * ema_results['top1']:.2f}%" if ema_results else "")
        )
    return {
        "step": step,
        "eval": eval_results,
        "eval_ema": ema_results,  # None without EMA
        "train_losses": dict(losses.history),
        "preempted": preempted,
        "stopped_by": stop.received if preempted else None,
        "checkpoint_dir": str(ckpt.directory),
    }
