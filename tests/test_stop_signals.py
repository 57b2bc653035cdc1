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
import threading

import pytest
from helpers import REPO, TINY_CONFIG, assert_params_identical, subprocess_env, train_py

from vit_jax import trained
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
