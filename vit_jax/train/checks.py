"""Checks on the training fields of a config (optimizer, schedule, loop), before any work starts.

Also the run's length (`total_steps_of`) and its batch sizes against the device mesh.

The data fields are checked by `vit_jax.data.validation`, the model's by `ViTConfig` itself; this
module covers the rest, so that nonsense (a negative learning rate trains by gradient ascent,
keep_checkpoints=0 deletes the final model) is one clear error instead of a silent bad run.
"""

from __future__ import annotations

import math
import numbers
import os

import ml_collections

from vit_jax import sharding
from vit_jax.train import distill
from vit_jax.train.step import LOSSES


def _int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config.{field}={value!r} is invalid: {allowed}")


def validate_training(config) -> None:
    """Raises ValueError naming the first bad training field, its value and what is allowed."""
    optim, schedule = config.optim, config.schedule
    lr = optim.learning_rate
    _require(_number(lr) and lr > 0, "optim.learning_rate", lr, "must be a number > 0")
    for field in ("weight_decay", "grad_clip_norm"):
        value = optim[field]
        _require(_number(value) and value >= 0, f"optim.{field}", value, "must be >= 0 (0 = off)")
    kwargs = dict(optim.get("kwargs") or {})  # the named optax optimizer's own arguments
    for field in ("momentum", "b1", "b2"):
        value = kwargs.get(field)
        if value is not None:
            _require(
                _number(value) and 0 <= value < 1,
                f"optim.kwargs.{field}",
                value,
                "must be in [0, 1)",
            )
    if kwargs.get("eps") is not None:
        eps = kwargs["eps"]
        _require(_number(eps) and eps > 0, "optim.kwargs.eps", eps, "must be > 0")

    warmup = schedule.warmup_steps
    _require(_int(warmup) and warmup >= 0, "schedule.warmup_steps", warmup, "must be an int >= 0")
    fraction = schedule.get("warmup_fraction") or 0
    _require(
        _number(fraction) and 0 <= fraction < 1,
        "schedule.warmup_fraction",
        fraction,
        "must be in [0, 1)",
    )
    end = schedule.end_lr_fraction
    _require(_number(end) and 0 <= end <= 1, "schedule.end_lr_fraction", end, "must be in [0, 1]")
    cooldown = schedule.cooldown_steps
    _require(
        _int(cooldown) and cooldown >= 0, "schedule.cooldown_steps", cooldown, "must be an int >= 0"
    )

    steps, epochs = config.get("total_steps"), config.get("total_epochs")
    _require(steps is None or (_int(steps) and steps >= 0), "total_steps", steps, "must be > 0")
    _require(
        epochs is None or (_number(epochs) and epochs >= 0), "total_epochs", epochs, "must be > 0"
    )
    accum = config.accum_steps
    _require(_int(accum) and accum >= 1, "accum_steps", accum, "must be an int >= 1")
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        value = config[field]
        _require(_int(value) and value >= 0, field, value, "must be an int >= 0 (0 = off)")
    keep = config.keep_checkpoints
    _require(
        _int(keep) and keep >= 1,
        "keep_checkpoints",
        keep,
        "must be an int >= 1 (the newest checkpoint is always kept)",
    )
    _require(config.loss in LOSSES, "loss", config.loss, f"allowed: {', '.join(LOSSES)}")
    for field in ("fsdp_min_size", "prefetch_to_device"):
        value = config[field]
        _require(_int(value) and value >= 0, field, value, "must be an int >= 0")
    per_dispatch = config.get("steps_per_dispatch", 1)
    _require(
        _int(per_dispatch) and per_dispatch >= 1,
        "steps_per_dispatch",
        per_dispatch,
        "must be an int >= 1 (1 = one step per call)",
    )
    decay = config.get("ema_decay", 0.0)
    _require(
        _number(decay) and 0 <= decay < 1,
        "ema_decay",
        decay,
        "must be in [0, 1) (0 = no EMA; e.g. 0.999 averages over ~1000 steps)",
    )
    check_fewshot(config.get("fewshot"))
    distill.check_fields(config.get("distill"))  # the teacher itself is read by plan_run


def check_fewshot(fewshot) -> None:
    """The few-shot fields (`config.fewshot`), before any data is read; the shots against the
    class sizes are checked once the train split's labels are read (`fewshot_loop.prepare`)."""
    if fewshot is None:
        return
    every = fewshot.every_steps
    _require(
        _int(every) and every >= 0, "fewshot.every_steps", every, "must be an int >= 0 (0 = off)"
    )
    shots, seeds = tuple(fewshot.shots), tuple(fewshot.seeds)
    _require(
        bool(shots) and all(_int(k) and k >= 1 for k in shots),
        "fewshot.shots",
        shots,
        "must be a non-empty tuple of ints >= 1 (examples per class), e.g. (1, 5, 10, 25)",
    )
    _require(
        bool(seeds) and all(_int(k) and k >= 0 for k in seeds),
        "fewshot.seeds",
        seeds,
        "must be a non-empty tuple of ints >= 0 (one draw of the shots each)",
    )
    datasets = fewshot.datasets
    _require(
        not isinstance(datasets, str) and all(isinstance(d, str) and d for d in datasets),
        "fewshot.datasets",
        datasets,
        "must be a tuple of dataset names (TFDS names or image folders); () = the run's own",
    )


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


def check_batch_sizes(config: ml_collections.ConfigDict, mesh) -> None:
    if config.accum_steps < 1 or config.batch_size % config.accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a multiple of "
            f"config.accum_steps={config.accum_steps} (>= 1)"
        )
    sharding.check_batch_size(config.batch_size, mesh)
    sharding.check_batch_size(
        config.batch_size // config.accum_steps, mesh, "micro-batch (batch_size / accum_steps)"
    )
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")


def check_workdir_apart_from_data(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir inside (or containing) the image folder trained on, or containing
    config.data_dir: run files would land in the dataset (the next run then refuses the folder's
    layout) and `--restart` would move the data away with the old run."""

    def real(path: str) -> str:
        return os.path.realpath(os.path.expanduser(path))

    def inside(path: str, root: str) -> bool:
        return os.path.commonpath([path, root]) == root

    if "://" in workdir:
        return
    work = real(workdir)
    dataset = str(config.get("dataset") or "")
    if dataset and "://" not in dataset and os.path.isdir(os.path.expanduser(dataset)):
        folder = real(dataset)
        if inside(work, folder) or inside(folder, work):
            where = "is" if work == folder else "is inside" if inside(work, folder) else "contains"
            raise ValueError(
                f"--workdir={workdir!r} {where} the image folder config.dataset={dataset!r}: run "
                f"files would be written into the dataset; use a workdir outside {folder}"
            )
    data_dir = config.get("data_dir")
    if data_dir and "://" not in str(data_dir) and inside(real(str(data_dir)), work):
        raise ValueError(
            f"--workdir={workdir!r} contains config.data_dir={data_dir!r}: run files would mix "
            f"with the prepared datasets (and --restart would move them aside with the run); use "
            f"a workdir outside {real(str(data_dir))}"
        )
