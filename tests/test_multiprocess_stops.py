"""train.py as one process per host: stops and start-up refusals, with real processes.

A SIGTERM to one process stops both at the same step with a checkpoint (also with several steps
per dispatch); a Ctrl-C to one process ends both, not a hang; a config or a workdir that differs
between the processes is refused before anything is written. The helpers (the `Run` of real processes, free ports, timeouts, cleanup of
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


def wait_until_training(r: Run) -> None:
    """Returns once process 0 logged a step: training has started on both (they step together)."""
    deadline = time.monotonic() + TIMEOUT_S
    while "step " not in r.output(0):
        assert time.monotonic() < deadline, r.output(0)[-3000:]
        assert all(p.poll() is None for p in r.procs), r.report([p.poll() for p in r.procs])
        time.sleep(0.5)


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
        wait_until_training(r)
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


# Well under JAX's own shutdown barrier timeout (300 s): a run that needed it would fail here.
ENDS_WITHIN_S = 150


def test_ctrl_c_on_one_process_ends_every_process_instead_of_hanging(
    tmp_path, digits_data_dir, compile_cache
):
    # The interrupted process ends at once; the other waits in the next step's collective for a
    # process that will never join. Only the shutdown barrier's bound ends it.
    extra = ["--config.total_steps=100000", "--config.checkpoint_every_steps=0"]
    extra += ["--distributed_shutdown_timeout=10"]
    r = Run(tmp_path / "interrupted", 2, 2, digits_data_dir, compile_cache, extra)
    try:
        wait_until_training(r)
        r.procs[1].send_signal(signal.SIGINT)
        codes = r.wait(timeout=ENDS_WITHIN_S)
    finally:
        r.kill()
    assert all(code != 0 for code in codes), r.report(codes)
    fatal = [line for line in r.output(1).splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1, r.report(codes)
    assert "interrupted (Ctrl-C) on process 1 of 2" in fatal[0]
    assert "the others end too" in fatal[0]
    assert "Shutdown barrier" in r.output(0), r.report(codes)  # JAX ended it, not our kill


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
