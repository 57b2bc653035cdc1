"""What a person sees of a run: progress lines, TensorBoard events, metrics.jsonl, curves.png.

Only process 0 writes or prints (on a pod every host runs the same loop); the others get no-ops.
All files go to the workdir:
  metrics.jsonl   one JSON object per line: {"step": 100, "split": "train", "loss": ..., ...};
                  a resumed run appends, and readers keep the last value per (split, step);
  events.out.tfevents.*   the same scalars for TensorBoard (`tensorboard --logdir <workdir>`);
  curves.png      loss and accuracy against steps, drawn at the end from metrics.jsonl.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from typing import Any

import jax
from etils import epath

from vit_jax.progress import is_main_process, log


class MetricWriter:
    """Scalars to TensorBoard and to metrics.jsonl in `workdir`."""

    def __init__(self, workdir: str | epath.Path):
        self.workdir = epath.Path(workdir)
        self._enabled = is_main_process()
        self._tensorboard = None
        if self._enabled:
            from tensorboardX import SummaryWriter  # imported late: process 0 only

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(logdir=str(self.workdir))
            self._jsonl = _JsonlAppender(self.workdir / "metrics.jsonl")

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        self._jsonl.append({"step": int(step), "split": split, **scalars})

    def close(self, interrupted: bool = False) -> None:
        """Closes both files. `interrupted`: a KeyboardInterrupt may have cut through tensorboardX's
        queue and left its writer thread waiting forever, so the thread is not joined (it is a
        daemon; events since its last flush are lost, metrics.jsonl has every line)."""
        if self._enabled:
            if not interrupted:
                self._tensorboard.close()
            self._jsonl.close()


class _JsonlAppender:
    """Appends one JSON line per call with a single `write(2)` on an O_APPEND descriptor.

    A kill can then only cut the last line short, never interleave two; a torn line left by an
    earlier run is ended first, so the next record starts on a line of its own.
    """

    def __init__(self, path: epath.Path):
        self.path = str(path)
        if "://" in self.path:  # remote: no O_APPEND; etils appends as well as it can
            self._file, self._fd = epath.Path(self.path).open("a"), None
            return
        self._file = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record) + "\n").encode()
        if self._fd is None:
            self._file.write(data.decode())
            self._file.flush()
        else:
            os.write(self._fd, data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        elif self._file is not None:
            self._file.close()


def read_metrics(path: str | epath.Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl → {split: {metric: [(step, value), ...] sorted by step}}, last write wins.

    A run resumed from step S rewrites steps after S; keeping the last value per step keeps the
    curves those of the run that finished. A line that is not a whole record (a kill during the
    append) is skipped with one warning.
    """
    latest: dict[tuple[str, str, int], float] = {}
    torn = []
    for number, line in enumerate(epath.Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record or "split" not in record:
                    raise ValueError("not a metrics record")
            except ValueError:
                torn.append(number)
                continue
            for key, value in record.items():
                if key not in ("step", "split"):
                    latest[(record["split"], key, record["step"])] = value
    if torn:
        log(f"WARNING skipped {len(torn)} unreadable line(s) of {path} (line {torn[0]}, ...)")
    curves: dict[str, dict[str, list]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for (split, key, step), value in sorted(latest.items(), key=lambda kv: kv[0][2]):
        curves[split][key].append((step, value))
    return {split: dict(metrics) for split, metrics in curves.items()}


def plot_curves(metrics_path: str | epath.Path, png_path: str | epath.Path) -> None:
    """Loss (train and eval) and eval accuracy against steps, side by side, as a PNG."""
    if not is_main_process():
        return
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    curves = read_metrics(metrics_path)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        if "loss" in curves.get(split, {}):
            steps, values = zip(*curves[split]["loss"])
            loss_ax.plot(steps, values, style, label=f"{split} loss", markersize=3)
    for name in sorted(set(curves.get("eval", {})) - {"loss", "count"}):  # evaluation.METRICS
        steps, values = zip(*curves["eval"][name])
        acc_ax.plot(steps, [100 * v for v in values], "o-", label=f"eval {name}", markersize=3)
    if loss_ax.lines:  # one x-axis for both panels, even when there was a single evaluation
        acc_ax.set_xlim(loss_ax.get_xlim())
    loss_ax.set(xlabel="step", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="step", ylabel="accuracy (%)", title="Eval accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(str(png_path), dpi=100)
    plt.close(fig)


class Progress:
    """Formats progress lines: step, loss, lr, images/s (total and per device), ETA.

    Throughput is measured between consecutive lines (wall time, so input stalls show up, but
    time spent inside `paused()` — evaluation, checkpointing — does not count). The first interval
    includes compilation, so the ETA is only estimated from the second line on.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._step_seconds: float | None = None
        self._paused_seconds = 0.0
        self._start_step = start_step
        self._train_seconds = 0.0  # summed over the intervals, pauses left out
        self._paused_total = 0.0

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._paused_seconds += elapsed
            self._paused_total += elapsed

    def line(self, step: int, scalars: dict[str, Any]) -> tuple[str, dict[str, float]]:
        """The progress line at `step` and the throughput figures (to log as metrics too)."""
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        seconds = max(now - self._last_time - self._paused_seconds, 1e-9)
        self._paused_seconds = 0.0
        self._train_seconds += seconds
        first_interval = self._step_seconds is None
        self._step_seconds = seconds / steps
        self._last_step, self._last_time = step, now
        images_per_sec = steps * self.batch_size / seconds
        throughput = {
            "images_per_sec": images_per_sec,
            "images_per_sec_per_device": images_per_sec / jax.device_count(),
        }
        if step >= self.total_steps:  # the last line says how long it took, never "ETA ?"
            eta = "0m00s (done)"
        elif first_interval:
            eta = "? (after compiling)"
        else:
            eta = _duration(self._step_seconds * (self.total_steps - step))
        width = len(str(self.total_steps))
        text = (
            f"step {step:>{width}}/{self.total_steps} | loss {scalars['loss']:.4f} | "
            f"lr {scalars['lr']:.3g} | {images_per_sec:,.0f} img/s "
            f"({throughput['images_per_sec_per_device']:,.0f}/device) | ETA {eta}"
        )
        return text, throughput

    def summary(self) -> str:
        """How long the steps of this run took, up to the last progress line: training (its first
        interval compiles the step) apart from evaluation and checkpoints."""
        steps = self._last_step - self._start_step
        images_per_sec = steps * self.batch_size / max(self._train_seconds, 1e-9)
        return (
            f"Training time: {_duration(self._train_seconds)} for {steps} steps "
            f"({images_per_sec:,.0f} img/s, compiling included); evaluation and checkpoints "
            f"{_duration(self._paused_total)}"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
