"""What a person sees while work runs: `log` lines and progress bars (tqdm) for long work.

`log(message)` is the project's one way to print a line of a run (process 0 only, above any bar).

Bars go to stderr and only when it is a terminal (tqdm's `disable=None`), so logs and pipes keep
the plain progress lines of `vit_jax.train.report`; only process 0 draws one. A bar never leaves a
stale line behind: one that finished stays on screen (with `leave=True`) showing its count, the
elapsed time and `00:00` remaining, never "?"; one that stopped early is cleared.

TFDS draws bars of its own while it prepares a dataset (with unknown totals, so "?", and also
off-terminal); `tfds_bars` switches them on only where ours would show, and our own builders
(`vit_jax.data.builders`) replace them with one bar per split.
"""

from __future__ import annotations

import contextlib
import sys

import tqdm


def is_main_process() -> bool:
    """Process 0 of the run: the one that prints and writes logs (on a pod every host runs)."""
    # Without jax imported nothing can have started more processes (and a builder run from
    # plain TFDS should not pay for importing it).
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def log(message: str) -> None:
    """A line on stdout from process 0, above any bar on screen (flushed: runs are watched live)."""
    if is_main_process():
        write(message)


class _Bar(tqdm.tqdm):
    def close(self):
        # Keep only a finished bar on screen: its last line then holds the totals, not an ETA
        # (or tqdm's "?" for a bar that never advanced).
        finished = self.n > 0 and (self.total is None or self.n >= self.total)
        if not finished:
            self.leave = False
        super().close()


def bar(
    total: int | None,
    desc: str,
    initial: int = 0,
    unit: str = "step",
    leave: bool = False,
    **kwargs,
) -> tqdm.tqdm:
    """A tqdm bar (a disabled one off-terminal or on processes other than 0).

    `leave=True` keeps the finished bar on screen (work with no progress lines of its own:
    preparation, conversion); the training and eval bars are cleared, their lines say it all.
    """
    return _Bar(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=leave,
        disable=None if is_main_process() else True,
        **kwargs,
    )


def shows() -> bool:
    """Whether `bar` would draw here (stderr is a terminal, process 0)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and is_main_process()


@contextlib.contextmanager
def tfds_bars(enable: bool):
    """TFDS's own progress bars on (`enable`) or off for the block; the previous state after."""
    from tensorflow_datasets.core.utils import tqdm_utils

    before = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(enable)
    try:
        yield
    finally:
        tqdm_utils.display_progress_bar(before)


def copy(source, destination, total: int | None, desc: str) -> None:
    """Copies one file object to another with a bar in bytes (a download: `total` from Content-Length)."""
    with bar(total, desc, unit="B", leave=True, unit_scale=True, unit_divisor=1024) as b:
        while chunk := source.read(1 << 20):
            destination.write(chunk)
            b.update(len(chunk))


def write(message: str) -> None:
    """Prints a line to stdout above any bar on screen (flushed: runs are watched live)."""
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
