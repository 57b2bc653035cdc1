"""Watching the training loss for NaN/inf without stalling the pipeline (used by `trainer.py`)."""

from __future__ import annotations

import jax
import numpy as np
from etils import epath


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the newest saved checkpoint."""


class LossWatch:
    """Per-step losses kept on device until needed, so checking them never stalls the pipeline.

    `check()` fetches them all at once (at log, eval and checkpoint time) and raises at the first
    non-finite one, naming its step; since it runs before every save, no NaN state is ever saved.
    """

    def __init__(self, checkpoint_dir: epath.Path, latest_saved: int | None):
        self._pending: list[tuple[int, jax.Array, int | None]] = []
        self._since_last_log: list[float] = []
        self.history: dict[int, float] = {}
        self.checkpoint_dir = checkpoint_dir
        self.latest_saved = latest_saved

    def add(self, step: int, loss: jax.Array, count: int | None = None) -> None:
        """The loss of `step`, or the (K,) losses of steps `step`..`step`+K-1 (one dispatch), of
        which only the first `count` are steps that ran (None: all)."""
        self._pending.append((step, loss, count))

    def check(self) -> None:
        """Fetches the pending losses; raises at the first non-finite one."""
        fetched = jax.device_get([v for _, v, _ in self._pending])
        steps, values = [], []
        for (first, _, count), value in zip(self._pending, fetched):
            value = np.atleast_1d(np.asarray(value, np.float64))[:count]
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
