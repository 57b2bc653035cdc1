"""Stopping a run cleanly: SIGTERM (preemption) and SIGINT (Ctrl-C) end it at a step boundary.

The first signal lets the current step finish; the trainer then saves a checkpoint and returns, and
the command exits 143 (SIGTERM) or 130 (SIGINT), the shell's 128 + signal convention, so `train &&
evaluate`, SLURM requeue and Kubernetes restart policies see an unfinished run. A second Ctrl-C
aborts at once (KeyboardInterrupt, nothing more saved; the newest committed checkpoint stays).

One process: our own handlers set a flag. Several processes: they must all stop at the same step,
or the checkpoint's collectives would hang, so JAX's preemption sync service (which
`jax.distributed.initialize` starts, and which catches SIGTERM itself) picks the step; without
that service SIGTERM keeps its default effect and the newest checkpoint is where a rerun resumes.
A Ctrl-C reaches one process only: it ends that one, unsaved, and JAX's shutdown barrier
(`vit_jax.distributed`, `--distributed_shutdown_timeout`) then ends the others.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax

EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}
ABORTED = "second Ctrl-C: aborted without saving; the newest committed checkpoint is kept"
_abort_deadline_s: float | None = None  # exit_if_abort_stalls


@contextlib.contextmanager
def exit_if_abort_stalls(seconds: float):
    """Within the block, a second Ctrl-C ends the process `seconds` later if unwinding has not.

    The abort is a KeyboardInterrupt raised wherever the main thread is, possibly inside a library
    that then waits forever on a thread of its own; a command line must still end "at once". Not
    for notebooks: there the kernel outlives the run, and the interrupt is the only way out."""
    global _abort_deadline_s
    before, _abort_deadline_s = _abort_deadline_s, seconds
    try:
        yield
    finally:
        _abort_deadline_s = before


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stop now, without finishing the step or saving."""

    abort_now = True  # vit_jax.tools.cli exits at once: an interrupted save's threads may never end


class StopSignals:
    """Context manager: `.received` is 'SIGTERM' / 'SIGINT' once one arrived, else None."""

    def __init__(self, log=print):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        self._after_clean_up = None  # the SIGINT handler to put back once the clean-up is over
        self._multihost = jax.process_count() > 1
        self._log = log

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        if getattr(signal.getsignal(signal.SIGINT), "pending", False):
            raise KeyboardInterrupt  # a Ctrl-C before the loop that was lost on its way (tools.cli)
        if self._multihost:  # SIGTERM is JAX's (the preemption service); Ctrl-C ends this one
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt_one)
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    @staticmethod
    def _interrupt_one(signum, frame):
        del signum, frame
        raise KeyboardInterrupt(
            f"interrupted (Ctrl-C) on process {jax.process_index()} of {jax.process_count()}: "
            f"it stops now without saving, and the others end too (a multi-process run stops "
            f"together, and saves, on SIGTERM); rerun the same command to resume from the newest "
            f"checkpoint"
        )

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and name == "SIGINT":
            self._abort(signum, None)
        if self.received is None:
            self.received = name
            if name == "SIGINT":
                print(
                    "Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again aborts "
                    "without saving)",
                    file=sys.stderr,
                    flush=True,
                )

    def should_stop(self, step: int, steps_done: int = 1) -> bool:
        """Whether to stop after `step`, the last of `steps_done` steps just run in one dispatch.

        JAX's sync service names one step to stop at and must be asked at every step, so each step
        of the dispatch is asked about; every process runs the same dispatches, so all of them stop
        at the end of the same one."""
        if self.received is not None:
            return True
        if not self._multihost:
            return False
        from jax.experimental import multihost_utils

        try:
            for done in range(step - steps_done + 1, step + 1):
                if multihost_utils.reached_preemption_sync_point(done):
                    self.received = "SIGTERM"
                    return True
        except RuntimeError:  # no preemption service: SIGTERM just ends the processes
            pass
        return False

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # After a Ctrl-C stop, the save and clean-up still run: another Ctrl-C aborts them.
            if signum == signal.SIGINT and self.received == "SIGINT":
                self._after_clean_up, previous = previous, self._abort
            signal.signal(signum, previous)
        self._previous = {}

    def clean_up_done(self) -> None:
        """After a Ctrl-C stop: the save and clean-up are over, the SIGINT handler from before the
        loop comes back (in a notebook, the kernel's: a later Ctrl-C is not an abort)."""
        if self._after_clean_up is not None:
            signal.signal(signal.SIGINT, self._after_clean_up)
            self._after_clean_up = None

    @staticmethod
    def _abort(signum, frame):
        del signum, frame
        if _abort_deadline_s is not None:
            timer = threading.Timer(_abort_deadline_s, _exit_now, (_abort_deadline_s,))
            timer.daemon = True
            timer.start()
        raise Aborted(ABORTED)


def _exit_now(waited_s: float) -> None:
    # os.write, not print: the stalled main thread may hold sys.stderr's lock.
    os.write(2, f"FATAL {ABORTED} (clean-up stalled; ended after {waited_s:g} s)\n".encode())
    os._exit(EXIT_STATUS["SIGINT"])
