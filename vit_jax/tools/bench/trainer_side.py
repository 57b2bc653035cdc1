"""The trainer against its own step: images/s through `train_and_evaluate` vs a bare jitted loop.

`measure(config, steps, workdir)` runs the real trainer (input pipeline, dispatch, logging,
checkpoint at the end) for `steps` steps in a fresh workdir, then times a bare loop of the very
same compiled step (`make_multi_step`'s program, one step per call) on one batch already on the
devices. Both figures leave compilation out: the
trainer's is the steady-state median of its own progress intervals (evaluation and checkpoints
excluded, as in its progress lines), the bare loop's the median of timed chunks after a warm-up
call, run before and after the trainer. Their ratio is what everything around the step costs.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import jax
import ml_collections

from vit_jax import sharding
from vit_jax.train import plan, trainer
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step

INTERVALS = 10  # progress intervals in the trainer's run; the first (compile) is dropped


def _trainer_config(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    config.total_steps = steps
    config.total_epochs = None
    config.log_every_steps = max(steps // INTERVALS, 1)
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 0
    return config


def run_trainer(config: ml_collections.ConfigDict, steps: int, workdir: str) -> dict[str, Any]:
    """The trainer's steady-state images/s (median of its progress intervals after the first)."""
    config = _trainer_config(config, steps)
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    wall_s = time.perf_counter() - start
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rates = [r["images_per_sec"] for r in records if r.get("split") == "train"]
    if len(rates) < 2:
        raise ValueError(f"steps={steps} gives {len(rates)} progress interval(s); need >= 2")
    return {
        "images_per_s": statistics.median(rates[1:]),
        "interval_images_per_s": rates,
        "wall_s": wall_s,
        "steps_per_dispatch": config.get("steps_per_dispatch", 1),
    }


def run_bare(
    config: ml_collections.ConfigDict, steps: int, data, repeats: int = 5
) -> dict[str, Any]:
    """A jitted loop of the trainer's own step on one device-resident batch: the model alone."""
    run = plan.plan_run(_trainer_config(config, steps), data)
    model, tx, mesh, shardings = run.model, run.tx, run.mesh, run.shardings
    state = train_state.init_state(model, tx, shardings, jax.random.key(config.seed))
    steps_fn = train_step.make_multi_step(  # the trainer's program, one step per call
        model, tx, mesh, shardings, accum_steps=config.accum_steps, seed=config.seed,
        loss=config.loss,
    )  # fmt: skip
    host = {k: v[None] for k, v in next(iter(data.train_iter(start_step=0))).items()}
    batch = {
        k: jax.make_array_from_process_local_data(sharding.stacked_batch_sharding(mesh), v)
        for k, v in host.items()
    }
    state, out = steps_fn(state, batch, 1)  # compile + warm up
    jax.block_until_ready(out)
    chunk = max(steps // repeats, 1)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(chunk):
            state, out = steps_fn(state, batch, 1)
        jax.block_until_ready((state, out))
        seconds.append((time.perf_counter() - start) / chunk)
    return {"images_per_s": config.batch_size / statistics.median(seconds), "step_s": seconds}


def measure(config: ml_collections.ConfigDict, steps: int, workdir: str) -> dict[str, Any]:
    """Both sides on the same machine: the bare loop before and after the trainer (half the steps
    each), so a change in the machine's load during the run hits both sides alike."""
    from vit_jax import data as data_lib

    data = data_lib.get_datasets(config)
    before = run_bare(config, steps // 2, data)
    ours = run_trainer(config, steps, workdir)
    after = run_bare(config, steps // 2, data)
    bare_images_per_s = (before["images_per_s"] + after["images_per_s"]) / 2
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "steps": steps,
        "batch_size": config.batch_size,
        "trainer": ours,
        "bare_step": {"images_per_s": bare_images_per_s, "before": before, "after": after},
        "trainer_over_bare": ours["images_per_s"] / bare_images_per_s,
    }
