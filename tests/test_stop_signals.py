"""Stopping a run: Ctrl-C (SIGINT) and SIGTERM finish the step, save a checkpoint and exit with the
shell's status (130, 143) in one last line that says to rerun; rerunning the same command resumes
from that checkpoint; a second Ctrl-C aborts at once without saving.

Real `train.py` processes of the tiny recipe, each bounded by a timeout and killed by its own PID
if it overruns.
"""

import os
import signal
import subprocess
import threading

import pytest
from helpers import REPO, TINY_CONFIG, subprocess_env, train_py

from vit_jax.train import workdir

# What none of the output may show: library start-up noise and tracebacks.
NOISE = ("oneDNN", "absl::InitializeLog", "FeatureConnector.dtype", "Traceback", "backend 'tpu'")


def signal_after_step(cmd, signals, step=2, timeout=300):
    """Starts `cmd`, sends `signals` (in order) once it printed `step`, returns (status, out, err).

    A signal after a first Ctrl-C is sent once the process has said it saw that one, as a person
    reads the message before pressing again: two signals that arrive while Python is inside one
    long C call run its handler once (CPython keeps one pending flag per signal, not a count).
    """
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=subprocess_env(import_checkout=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_lines: list[str] = []
    acknowledged = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            err_lines.append(line)
            if line.startswith("Ctrl-C: finishing this step"):
                acknowledged.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= step:
                for i, signum in enumerate(signals):
                    if i and signals[i - 1] == signal.SIGINT:
                        assert acknowledged.wait(timeout), "the first Ctrl-C was never reported"
                    proc.send_signal(signum)
                break
        proc.wait(timeout=timeout)  # what follows the signal is a few lines: no pipe fills up
        out = proc.stdout.read()
        reader.join(timeout=10)
        return proc.returncode, "".join(lines) + out, "".join(err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child only
            proc.wait()


@pytest.mark.slow  # three train.py processes
def test_ctrl_c_and_sigterm_save_exit_with_shell_status_and_resume(digits_data_dir, tmp_path):
    cmd = train_py(TINY_CONFIG, tmp_path / "w", digits_data_dir, "--config.total_steps=100000")
    status, out, err = signal_after_step(cmd, [signal.SIGINT], step=2)
    assert status == 130, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("Stopped by SIGINT at step ") and "rerun the same command" in last
    stopped_at = int(last.split("at step ")[1].split()[0])
    assert str(stopped_at) in os.listdir(tmp_path / "w" / "checkpoints")
    assert not any(n in err for n in NOISE), err

    status, out, err = signal_after_step(cmd, [signal.SIGTERM], step=stopped_at + 1)
    assert status == 143, err
    assert f"Resuming from the checkpoint of step {stopped_at}" in out
    assert out.strip().splitlines()[-1].startswith("Stopped by SIGTERM at step ")

    newest = workdir.latest_checkpoint_step(str(tmp_path / "w"))
    status, out, err = signal_after_step(cmd, [signal.SIGINT, signal.SIGINT], step=newest + 1)
    assert status == 130
    assert err.strip().splitlines()[-1].startswith("FATAL second Ctrl-C: aborted without saving")
    assert workdir.latest_checkpoint_step(str(tmp_path / "w")) == newest  # nothing newer saved
