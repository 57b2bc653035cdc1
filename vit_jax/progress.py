"""Progress bars (tqdm) for long work: training steps and evaluation batches.

Bars go to stderr and only when it is a terminal (tqdm's `disable=None`), so logs and pipes keep
the plain progress lines of `vit_jax.metrics`; only process 0 draws one. A finished bar shows the
elapsed time and `00:00` remaining, never "?": `close()` completes it before it is left on screen.
"""

from __future__ import annotations

import sys

import jax
import tqdm


def bar(total: int | None, desc: str, initial: int = 0, unit: str = "step"):
    """A tqdm bar (a disabled one off-terminal or on processes other than 0)."""
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,  # the progress lines already say where the run is; no stale bars in the log
        disable=None if jax.process_index() == 0 else True,
    )


def write(message: str) -> None:
    """Prints a line to stdout above any bar on screen (flushed: runs are watched live)."""
    tqdm.tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
