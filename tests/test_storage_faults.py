"""Storage faults: a save that cannot be written (a full disk, a file in the way) ends the run at
once in one FATAL line naming the path, with no barrier timeout, and the earlier checkpoints stay
readable; a metrics.jsonl line torn by a kill is skipped with a warning, and later appends start a
line of their own.
"""

import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from helpers import REPO, TINY_CONFIG, subprocess_env, train_py

from vit_jax import checkpoints, trained
from vit_jax.model.config import ViTConfig
from vit_jax.train import report


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(
    tiny_workdir, digits_data_dir, tmp_path
):
    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    cmd = train_py(TINY_CONFIG, work, digits_data_dir, "--config.total_steps=8")

    # A full disk, made real enough: the child's writes past 4 KiB fail with EFBIG (Python ignores
    # SIGXFSZ), so the tiny checkpoint's array file cannot be written. (A wrapper sets the limit
    # and execs train.py: no fork from this multithreaded test process.)
    limit = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", limit, *cmd[1:]],
        cwd=REPO,
        env=subprocess_env(import_checkout=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("FATAL CheckpointWriteError: could not write")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(work / "checkpoints" / "4") in result.stderr  # the save that failed, named
    assert time.monotonic() - start < 240  # no barrier timeout (Orbax's is 300 s+)
    config, params = trained.read_model(work / "checkpoints" / "3")
    assert config.hidden_size == 32 and params


def test_a_save_into_an_unwritable_place_fails_in_one_line_naming_the_path(tmp_path):
    blocked = tmp_path / "checkpoints"
    blocked.write_text("a file where the checkpoint directory should be")
    ckpt = checkpoints.TrainCheckpoints(blocked, keep=2, async_save=True)
    state = {"params": {"w": jnp.ones((4,))}, "opt_state": (), "step": jnp.zeros((), jnp.int32)}
    start = time.monotonic()
    with pytest.raises(checkpoints.CheckpointWriteError, match=str(blocked)):
        ckpt.save(1, state, ViTConfig(), {"step": 1})
    assert time.monotonic() - start < 10
    ckpt.close()


def test_metrics_jsonl_torn_line_is_skipped_and_appends_start_a_new_line(tmp_path, capsys):
    writer = report.MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 2.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # a kill in the middle of an append
    writer = report.MetricWriter(tmp_path)
    writer.write(3, "train", {"loss": 1.0})
    writer.close()
    curves = report.read_metrics(tmp_path / "metrics.jsonl")
    assert curves["train"]["loss"] == [(1, 2.0), (3, 1.0)]
    assert "WARNING skipped 1 unreadable line(s)" in capsys.readouterr().out
