"""train.py as one process per host: stops and start-up refusals, with real processes.

A SIGTERM to one process stops both at the same step with a checkpoint (also with several steps
per dispatch); a config or a workdir that differs between the processes is refused before
anything is written. The helpers (the `Run` of real processes, free ports, timeouts, cleanup of
only the PIDs started here) are test_multiprocess.py's.
"""

from __future__ import annotations

import signal
import time

import pytest
from test_multiprocess import TIMEOUT_S, Run, final_params

from vit_jax import checkpoints

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One JAX persistent compilation cache for this file's children."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.parametrize(
    "steps_per_dispatch, log_every",
    [(1, 1), (8, 50)],  # (8, 50): mostly 8-step dispatches
)
def test_sigterm_to_one_process_stops_both_at_the_same_step(
    tmp_path, digits_data_dir, compile_cache, steps_per_dispatch, log_every
):
    workdir = tmp_path / "preempted"
    r = Run(
        workdir,
        2,
        2,
        digits_data_dir,
        compile_cache,
        [
            "--config.total_steps=100000",
            "--config.checkpoint_every_steps=0",
            f"--config.steps_per_dispatch={steps_per_dispatch}",
            f"--config.log_every_steps={log_every}",
        ],
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "step " not in r.output(0):  # training has started on both (they step together)
            assert time.monotonic() < deadline, r.output(0)[-3000:]
            assert all(p.poll() is None for p in r.procs), r.output(0)[-3000:] + r.output(1)
            time.sleep(0.5)
        r.procs[1].send_signal(signal.SIGTERM)
        r.check(expected_status=143)  # 128 + SIGTERM: preempted, not done
    finally:
        r.kill()
    stops = []
    for i in range(2):
        lines = [line for line in r.output(i).splitlines() if f"Process {i} stops at step" in line]
        assert len(lines) == 1, r.output(i)[-3000:]
        stops.append(int(lines[0].rsplit(" ", 1)[1]))
    assert stops[0] == stops[1]
    assert f"Stopped by SIGTERM at step {stops[0]} after saving" in r.output(0)
    assert checkpoints.TrainCheckpoints(workdir / "checkpoints").all_steps() == [stops[0]]
    assert final_params(workdir)  # the checkpoint is whole and readable


def test_different_configs_on_different_processes_stop_before_anything(
    tmp_path, digits_data_dir, compile_cache
):
    workdir = tmp_path / "mismatch"
    # Process 1 gets another seed: what a typo in one host's command line does.
    only = {1: ["--config.seed=1"]}
    r = Run(workdir, 2, 2, digits_data_dir, compile_cache, ["--config.total_steps=6"], only=only)
    for fatal in r.fatal_lines():
        assert "config differs between processes" in fatal
        assert "process(es) [1] do not match process 0" in fatal
    assert not workdir.exists()


def test_a_workdir_not_shared_by_every_process_is_named_before_anything(
    tmp_path, digits_data_dir, compile_cache
):
    # Process 1 sees another directory: what a per-host local disk path does on a real cluster.
    elsewhere = tmp_path / "elsewhere"
    only = {1: [f"--workdir={elsewhere}"]}
    r = Run(
        tmp_path / "shared",
        2,
        2,
        digits_data_dir,
        compile_cache,
        ["--config.total_steps=6"],
        only=only,
    )
    for fatal in r.fatal_lines():
        assert "is not shared: process(es) [1]" in fatal
    # Nothing but the (removed) check token was ever written: no config, logs or checkpoints.
    assert list((tmp_path / "shared").iterdir()) == []
    assert not elsewhere.exists() or list(elsewhere.iterdir()) == []
