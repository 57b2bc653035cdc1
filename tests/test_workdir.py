"""Workdir ownership: one trainer at a time (a lock the kernel drops when its holder dies, so a
dead one's lock is never stale); a workdir keeps its recipe (harmless fields such as log intervals
may change, the rest is refused); `--restart` moves the previous run aside to previous-<n>, and a
restart refused after that move puts it back; a folder whose config.json no trainer wrote is not a
workdir, and nothing is written in it.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env, tiny_recipe

from vit_jax.train import workdir


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_is_not_stale(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from vit_jax.train import workdir; "
            f"w = workdir.Workdir({str(tmp_path / 'w')!r}); w.claim(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        cwd=REPO,
        env=subprocess_env(import_checkout=True),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirConflictError, match=f"pid {holder.pid}"):
            workdir.Workdir(str(tmp_path / "w")).check_not_in_use()
    finally:
        holder.kill()  # killed like a preempted trainer: the kernel drops its lock
        holder.wait(timeout=30)
    workdir.Workdir(str(tmp_path / "w")).check_not_in_use()  # no stale lock


def test_the_processes_of_one_run_probing_the_lock_together_do_not_refuse_each_other(tmp_path):
    import fcntl

    (tmp_path / "w").mkdir()
    lock = tmp_path / "w" / ".lock"
    lock.write_text("pid 1 on host since then\n")  # a finished run's lock file stays behind
    with open(lock) as other_probe:  # another process of the run probing at this moment
        fcntl.flock(other_probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        workdir.Workdir(str(tmp_path / "w")).check_not_in_use()


def test_harmless_fields_may_change_but_not_the_recipe():
    old = {"seed": 0, "log_every_steps": 10, "mesh": {"data": -1}, "optim": {"learning_rate": 1e-3}}
    harmless = {**old, "log_every_steps": 5, "mesh": {"data": 2}, "steps_per_dispatch": 8}
    assert workdir.config_differences(old, harmless) == []
    changed = {**old, "seed": 1, "optim": {"learning_rate": 2e-3}}
    assert workdir.config_differences(old, changed) == [
        "optim.learning_rate 0.001 → 0.002",
        "seed 0 → 1",
    ]


def test_restart_moves_the_previous_run_aside(tiny_workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    owner = workdir.Workdir(str(work), restart=True)
    owner.claim()
    owner.release()
    assert not (work / "checkpoints").exists()
    assert (work / "previous-1" / "checkpoints" / "3").is_dir()
    assert (work / "previous-1" / "config.json").is_file()


def _listing(root) -> dict[str, int]:
    """Every file below `root` with its size; the lock file aside (it names its last holder)."""
    root = pathlib.Path(root)
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


def test_a_restart_refused_after_the_move_puts_the_previous_run_back(
    tiny_workdir, digits_data_dir, tmp_path
):
    from vit_jax.train import trainer

    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    before = _listing(work)
    config = tiny_recipe()
    config.data_dir = digits_data_dir
    config.init_from = str(tmp_path / "missing.npz")  # found missing only after the move
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        trainer.train_and_evaluate(config, str(work), restart=True)
    assert _listing(work) == before
    assert not (work / "previous-1").exists()


def test_a_folder_whose_config_json_no_trainer_wrote_is_not_a_workdir(digits_data_dir, tmp_path):
    from vit_jax.train import trainer

    export = tmp_path / "hf_export"  # what `convert --to hf` writes
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    (export / "model.safetensors").write_bytes(b"weights")
    before = _listing(export)
    config = tiny_recipe()
    config.data_dir = digits_data_dir
    for restart in (False, True):
        with pytest.raises(workdir.WorkdirConflictError, match="is not a training config"):
            trainer.train_and_evaluate(config, str(export), restart=restart)
    assert _listing(export) == before and not (export / ".lock").exists()
