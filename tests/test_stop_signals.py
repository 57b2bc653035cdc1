"""Stopping a run: Ctrl-C (SIGINT) and SIGTERM finish the step, save a checkpoint and exit with the
shell's status (130, 143) in one last line that says to rerun; rerunning the same command resumes
from that checkpoint; a second Ctrl-C aborts at once without saving.

Real `train.py` processes of the tiny recipe, each bounded by a timeout and killed by its own PID
if it overruns.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
from helpers import (
    REPO,
    TINY_CONFIG,
    assert_params_identical,
    dump_python_stacks,
    subprocess_env,
    train_py,
)

from vit_jax import trained
from vit_jax.train import report, stops, workdir

# What none of the output may show: library start-up noise and tracebacks.
NOISE = ("oneDNN", "absl::InitializeLog", "FeatureConnector.dtype", "Traceback", "backend 'tpu'")


def signal_after_step(cmd, signals, step=2, timeout=300):
    """Starts `cmd`, sends `signals` (in order) once it printed `step`, returns (status, out, err).

    A signal after a first Ctrl-C is sent once the process has said it saw that one, as a person
    reads the message before pressing again: two signals that arrive while Python is inside one
    long C call run its handler once (CPython keeps one pending flag per signal, not a count).
    A run that does not end within `timeout` fails the test with every thread's Python stack.
    """
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(import_checkout=True, PYTHONFAULTHANDLER="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out_lines: list[str] = []
    err_lines: list[str] = []
    reached, acknowledged = threading.Event(), threading.Event()

    def read_stdout():
        for line in proc.stdout:
            out_lines.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
                reached.set()

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("Ctrl-C: finishing this step"):
                acknowledged.set()

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    try:
        while signals and not reached.wait(1) and proc.poll() is None:
            if time.monotonic() > deadline:
                hung(proc, readers, err_lines, f"did not reach step {step} in {timeout} s")
        for i, signum in enumerate(signals if reached.is_set() else []):
            if i and signals[i - 1] == signal.SIGINT:
                assert acknowledged.wait(timeout), "the first Ctrl-C was never reported"
            proc.send_signal(signum)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0) + timeout)
        except subprocess.TimeoutExpired:
            names = [s.name for s in signals]
            hung(proc, readers, err_lines, f"did not end within {timeout} s of {names}")
        for reader in readers:
            reader.join(timeout=10)
        return proc.returncode, "".join(out_lines), "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child only
            proc.wait()


def hung(proc, readers, err_lines, what):
    dump_python_stacks([proc])
    for reader in readers:
        reader.join(timeout=10)
    pytest.fail(f"{' '.join(proc.args)} {what}; its stderr ends:\n{''.join(err_lines)[-8000:]}")


STEPS = 200  # long enough that every signal below lands well before the end
# The stopped run's legs, in order: the harmless fields (workdir.HARMLESS) each leg changes, and how
# it ends. 'COPY': a copy of the dataset; 'OTHER_RUN': the reference's workdir (a resume ignores it).
LEGS = [
    {"log_every_steps": 8, "checkpoint_every_steps": 25},  # SIGINT
    {  # SIGTERM
        "steps_per_dispatch": 1,
        "log_every_steps": 1,
        "checkpoint_every_steps": 7,
        "keep_checkpoints": 1,
        "eval_every_steps": 50,
        "eval_split": "train",
        "data_dir": "COPY",
        "init_from": "OTHER_RUN",
    },
    {"log_every_steps": 5, "checkpoint_every_steps": 10, "async_checkpoints": False},  # SIGKILL
    {"log_every_steps": 16, "prefetch_to_device": 0},  # Ctrl-C twice: aborted, nothing saved
    {"log_every_steps": 50, "eval_batch_size": 120},  # to the end
]
STOPS = [[signal.SIGINT], [signal.SIGTERM], [signal.SIGKILL], [signal.SIGINT, signal.SIGINT], []]


@pytest.mark.slow  # six train.py processes
def test_every_stop_resumes_exactly_with_other_harmless_fields(digits_data_dir, tmp_path):
    """SIGINT, SIGTERM, SIGKILL and a second Ctrl-C at random steps, each leg resumed with other
    harmless fields (LEGS): the finished run has the uninterrupted one's params, bit for bit, and
    its final line. The tiny recipe's on-device batches, up to 8 steps per dispatch (groups of 8,
    5 or 1 between the legs' log steps; the reference logs every step, so all its groups are 1)."""

    def command(workdir_path, fields=(), paths=None):
        fields = {"total_steps": STEPS, "checkpoint_every_steps": 0, **dict(fields)}
        data_dir = (paths or {}).get(fields.pop("data_dir", None), digits_data_dir)
        extra = [f"--config.{k}={(paths or {}).get(v, v)}" for k, v in fields.items()]
        return train_py(TINY_CONFIG, workdir_path, data_dir, *extra)

    status, out, err = signal_after_step(command(tmp_path / "reference"), [], step=STEPS)
    assert status == 0, err
    reference_line = out.strip().splitlines()[-1]
    assert reference_line.startswith("Final test accuracy")

    shutil.copytree(digits_data_dir, tmp_path / "data_copy")
    paths = {"COPY": str(tmp_path / "data_copy"), "OTHER_RUN": str(tmp_path / "reference")}
    work = tmp_path / "w"
    rng = random.Random(24)  # seeded: a failure names moments that a rerun reproduces
    newest, moments = 0, []
    for fields, signals in zip(LEGS, STOPS, strict=True):
        cmd = command(work, fields, paths)
        at = newest + rng.randrange(3, 30)  # signals after the first progress line from here
        moments.append((at, [s.name for s in signals]))
        status, out, err = signal_after_step(cmd, signals, step=at if signals else STEPS)
        if newest:
            assert f"Resuming from the checkpoint of step {newest}" in out, (moments, out)
        last = out.strip().splitlines()[-1]
        if signals == [signal.SIGINT]:
            assert status == 130 and last.startswith("Stopped by SIGINT at step "), (moments, err)
            assert "rerun the same command" in last
            assert str(int(last.split("at step ")[1].split()[0])) in os.listdir(
                work / "checkpoints"
            )
            assert not any(n in err for n in NOISE), err
        elif signals == [signal.SIGTERM]:
            assert status == 143 and last.startswith("Stopped by SIGTERM at step "), (moments, err)
        elif signals == [signal.SIGKILL]:
            assert status == -signal.SIGKILL, (moments, err)
        elif signals:  # the second Ctrl-C aborts at once: nothing newer than before is saved
            assert status == 130, (moments, err)
            assert err.strip().splitlines()[-1].startswith("FATAL second Ctrl-C: aborted without")
            assert workdir.latest_checkpoint_step(str(work)) == newest, moments
        else:
            assert status == 0 and last == reference_line, (moments, err)
        newest = workdir.latest_checkpoint_step(str(work))
    assert_params_identical(
        trained.read_model(str(work))[1],
        trained.read_model(str(tmp_path / "reference"))[1],
    )


# The second Ctrl-C is a KeyboardInterrupt raised wherever the main thread is: inside a library it
# can leave that library waiting forever on a thread of its own (tensorboardX's writer thread did,
# about one abort in ten: its queue's condition variable lost the waiter it was notifying).

STALLED_CLEAN_UP = """
import os, signal, sys, threading
from vit_jax.train import stops
with stops.exit_if_abort_stalls(float(sys.argv[1])), stops.StopSignals():
    os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step and save
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the second: abort
    except stops.Aborted:
        threading.Event().wait()  # a clean-up that never ends
"""


def test_a_second_ctrl_c_ends_the_command_even_if_the_clean_up_never_returns():
    proc = subprocess.run(
        [sys.executable, "-c", STALLED_CLEAN_UP, "0.5"],
        env=subprocess_env(import_checkout=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"FATAL {stops.ABORTED} (clean-up stalled"), proc.stderr


def test_in_a_notebook_a_second_ctrl_c_is_an_exception_and_then_ctrl_c_is_the_kernels_again():
    assert stops._abort_deadline_s is None  # only the command line sets one
    handler, threads = signal.getsignal(signal.SIGINT), set(threading.enumerate())
    stop = stops.StopSignals()
    try:
        with pytest.raises(stops.Aborted), stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.clean_up_done()  # what the trainer does once its clean-up is over
    assert set(threading.enumerate()) <= threads  # no timer that would end the process
    assert signal.getsignal(signal.SIGINT) is handler


def test_closing_the_metrics_after_an_interrupt_does_not_wait_for_tensorboards_thread(tmp_path):
    writer = report.MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 2.0})
    tensorboard = writer._tensorboard
    writer._tensorboard = mock.Mock(close=mock.Mock(side_effect=AssertionError("joined")))
    writer.close(interrupted=True)
    tensorboard.close()  # the real one, which this test's interrupt did not break
    assert report.read_metrics(tmp_path / "metrics.jsonl")["train"]["loss"] == [(1, 2.0)]
