"""train.py as one process per host, with real processes on localhost (2 x 2 CPU devices vs 1 x 4).

The same config and seed must give the same run on any topology: the per-step losses, final
params, EMA weights and few-shot accuracies of 2 processes x 2 devices equal those of 1 x 4; a checkpoint written by
either resumes on the other and ends where the uninterrupted run ends; a SIGTERM to one process
stops both at the same step with a checkpoint (also with several steps per dispatch); a damaged
checkpoint and `--restart` are handled once, by process 0, with the other process waiting for it. Every child is bounded by a timeout and killed in
`finally` (only the PIDs started here); ports are picked free at run time. Stops and start-up
refusals are in test_multiprocess_stops.py (a file of their own, so the two halves run in
parallel under `--dist loadfile`); it imports the helpers below.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, TINY_CONFIG, dump_python_stacks, free_port, subprocess_env

from vit_jax import checkpoints, trained

TIMEOUT_S = 600  # per run of train.py (all its processes); ~30 s each on idle cores
STEPS = 6

# The tiny recipe (configs/digits.py:tiny): what is tested is the plumbing, not the accuracy.
# Smaller batches, checkpoints every 3 steps (all kept), no prefetch, a 2-step warmup. The model
# keeps three choices of the full digits recipe: stochastic depth, so per-example randomness must
# match across topologies too, and mean pooling with fixed sin-cos position embeddings, under
# which the attention key bias's rounding noise stays within assert_same_params's atol (with a
# class token and learned embeddings it reaches ~3e-6 in 6 steps).
TINY = [
    "--config.batch_size=16",
    "--config.eval_batch_size=40",
    "--config.checkpoint_every_steps=3",
    "--config.keep_checkpoints=5",
    "--config.prefetch_to_device=0",
    "--config.schedule.warmup_steps=2",
    "--config.model.drop_path_rate=0.1",
    "--config.model.pool=gap",
    "--config.model.posemb=sincos2d",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> str:
    """One JAX persistent compilation cache for all the children: later runs skip compiling."""
    return str(tmp_path_factory.mktemp("jax_cache"))


def child_env(devices: int, cache_dir: str) -> dict[str, str]:
    return subprocess_env(
        devices=devices,
        import_checkout=True,
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONFAULTHANDLER="1",
    )


def coordinator_flags(port: int, processes: int, process_id: int) -> list[str]:
    """train.py's flags for process `process_id` of a `processes`-process run on localhost."""
    if processes == 1:
        return []
    return [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={processes}",
        f"--process_id={process_id}",
        "--distributed_init_timeout=120",
    ]


class Run:
    """`train.py` started as `processes` processes with `devices` CPU devices each."""

    def __init__(
        self, workdir, processes, devices, data_dir, cache_dir, extra=(), logs=None, only=None
    ):
        self.workdir = pathlib.Path(workdir)
        self.logs = [
            pathlib.Path(logs or self.workdir.parent) / f"{self.workdir.name}.{i}.log"
            for i in range(processes)
        ]
        port = free_port()
        self.procs = []
        for i in range(processes):
            args = [
                sys.executable,
                str(REPO / "train.py"),
                f"--config={TINY_CONFIG}",
                f"--workdir={self.workdir}",
                f"--config.data_dir={data_dir}",
                *TINY,
                *extra,
                *(only or {}).get(i, ()),  # arguments for process i alone
            ]
            args += coordinator_flags(port, processes, i)
            with open(self.logs[i], "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        args,
                        cwd=REPO,
                        env=child_env(devices, cache_dir),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def output(self, i: int = 0) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in self.procs]
        except subprocess.TimeoutExpired:
            dump_python_stacks(self.procs)
            self.kill()
            codes = [p.returncode for p in self.procs]
            pytest.fail(f"train.py did not finish in {timeout} s:\n{self.report(codes, tail=8000)}")

    def kill(self) -> None:
        for p in self.procs:  # only the children this Run started
            if p.poll() is None:
                p.kill()
                p.wait()

    def fatal_lines(self) -> list[str]:
        """Waits for every process; each must fail with exactly one FATAL line: those lines."""
        try:
            codes = self.wait()
        finally:
            self.kill()
        lines = []
        for i, code in enumerate(codes):
            fatal = [line for line in self.output(i).splitlines() if line.startswith("FATAL")]
            assert code != 0 and len(fatal) == 1, self.report(codes)
            lines.append(fatal[0])
        return lines

    def report(self, codes: list[int], tail: int = 3000) -> str:
        """Every process's exit status and the end of its output: one alone rarely says why."""
        return "\n".join(
            f"process {i} exit {c}:\n{self.output(i)[-tail:]}" for i, c in enumerate(codes)
        )

    def check(self, expected_status: int = 0) -> None:
        codes = self.wait()
        assert codes == [expected_status] * len(codes), self.report(codes)


# The runs of this file keep an EMA of the weights too (part of the train state, sharded like the
# params): it must come out the same on every topology and through every resume.
EMA = ["--config.ema_decay=0.9"]


def run(tmp_path, name, processes, devices, data_dir, cache_dir, extra=()) -> pathlib.Path:
    workdir = tmp_path / name
    r = Run(workdir, processes, devices, data_dir, cache_dir, [*EMA, *extra])
    try:
        r.check()
    finally:
        r.kill()
    return workdir


def train_losses(workdir) -> dict[int, float]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}  # last write wins


def final_params(workdir, weights="raw"):
    _, params = trained.read_model(workdir, weights=weights)
    return params


def assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    """Equal to float tolerance. The absolute part is for parameters that only ever receive
    rounding noise as gradient (the attention key bias: softmax ignores it), which Adam turns into
    steps of ~learning-rate size in random directions; they stay near 0 (|x| < 1e-6)."""
    import jax

    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def copy_checkpoint(src_workdir, step, dst_workdir) -> None:
    """A workdir holding only `src_workdir`'s checkpoint of `step`: where a resumed run starts."""
    (dst_workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        src_workdir / "checkpoints" / str(step), dst_workdir / "checkpoints" / str(step)
    )


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, digits_data_dir, compile_cache):
    """The same 6 steps on 1 process x 4 devices and on 2 processes x 2 devices, with few-shot
    evaluations at steps 3 and 6 (features over the mesh, gathered once)."""
    tmp = tmp_path_factory.mktemp("runs")
    extra = [f"--config.total_steps={STEPS}", "--config.fewshot.every_steps=3"]
    extra += ["--config.fewshot.shots=1,5"]
    one = run(tmp, "one_by_four", 1, 4, digits_data_dir, compile_cache, extra)
    two = run(tmp, "two_by_two", 2, 2, digits_data_dir, compile_cache, extra)
    return tmp, one, two


def test_two_processes_train_exactly_like_one(reference_runs):
    _, one, two = reference_runs
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses_two[s] for s in sorted(losses_two)],
        [losses_one[s] for s in sorted(losses_one)],
        rtol=1e-5,
    )
    assert_same_params(final_params(two), final_params(one))
    assert_same_params(final_params(two, "ema"), final_params(one, "ema"))
    # Only process 0 writes logs: one TensorBoard file, one metrics line per step.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    assert "Topology: 2 process(es)" in (two.parent / "two_by_two.0.log").read_text()
    assert "2 local / 4 global cpu devices" in (two.parent / "two_by_two.0.log").read_text()
    assert (two.parent / "two_by_two.1.log").read_text().count("step ") == 0


def fewshot_records(workdir) -> dict[int, dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r for r in records if r["split"] == "fewshot"}


def test_few_shot_accuracy_on_two_processes_is_the_one_process_figure(reference_runs):
    _, one, two = reference_runs
    on_one, on_two = fewshot_records(one), fewshot_records(two)
    assert sorted(on_one) == sorted(on_two) == [3, STEPS]
    for step in on_one:
        assert set(on_one[step]) == set(on_two[step]) >= {"digits_1shot", "digits_5shot"}
        for key in ("digits_1shot", "digits_5shot"):
            # Accuracies over 360 test images: the same, or one image apart where a feature
            # sits within rounding of a decision boundary.
            assert abs(on_one[step][key] - on_two[step][key]) <= 1 / 360 + 1e-9, (step, key)


@pytest.mark.parametrize(
    "source, processes, devices", [("two_by_two", 1, 4), ("one_by_four", 2, 2)]
)
def test_checkpoint_resumes_on_another_process_count(
    reference_runs, digits_data_dir, compile_cache, source, processes, devices
):
    tmp, one, _ = reference_runs
    resumed = tmp / f"from_{source}_on_{processes}"
    copy_checkpoint(tmp / source, 3, resumed)
    # ... and with other harmless fields (workdir.HARMLESS), as a preempted job may come back
    other = ["--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1"]
    other += ["--config.eval_batch_size=20", "--config.async_checkpoints=False"]
    run(
        tmp,
        resumed.name,
        processes,
        devices,
        digits_data_dir,
        compile_cache,
        [f"--config.total_steps={STEPS}", *other],
    )
    log = (tmp / f"{resumed.name}.0.log").read_text()
    assert "Resuming from the checkpoint of step 3" in log
    assert "continues exactly" in log
    losses, reference = train_losses(resumed), train_losses(one)
    assert sorted(losses) == [4, 5, 6]
    np.testing.assert_allclose(
        [losses[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)], rtol=1e-5
    )
    assert_same_params(final_params(resumed), final_params(one))
    assert_same_params(final_params(resumed, "ema"), final_params(one, "ema"))


def test_a_damaged_checkpoint_is_moved_aside_once_and_both_resume_from_the_previous_one(
    reference_runs, digits_data_dir, compile_cache
):
    tmp, one, two = reference_runs
    damaged = tmp / "damaged"
    shutil.copytree(two, damaged)
    record = damaged / "checkpoints" / str(STEPS) / "integrity" / "metadata"
    data = json.loads(record.read_text())
    data["arrays"][sorted(data["arrays"])[0]] = "deadbeef"  # garbled bytes that load silently
    record.write_text(json.dumps(data))
    run(tmp, damaged.name, 2, 2, digits_data_dir, compile_cache, [f"--config.total_steps={STEPS}"])
    log = (tmp / "damaged.0.log").read_text()
    assert f"WARNING checkpoint step {STEPS} in" in log and "is damaged" in log
    assert "Resuming from the checkpoint of step 3" in log
    assert (damaged / checkpoints.DAMAGED_DIR / str(STEPS) / "integrity").is_dir()
    assert checkpoints.TrainCheckpoints(damaged / "checkpoints").all_steps() == [3, STEPS]
    assert_same_params(final_params(damaged), final_params(one))
    assert_same_params(final_params(damaged, "ema"), final_params(one, "ema"))


def test_restart_moves_the_previous_run_aside_before_any_process_reads_it(
    reference_runs, digits_data_dir, compile_cache
):
    tmp, _, two = reference_runs
    restarted = tmp / "restarted"
    shutil.copytree(two, restarted)
    extra = ["--restart", "--config.seed=1", f"--config.total_steps={STEPS}"]
    run(tmp, restarted.name, 2, 2, digits_data_dir, compile_cache, extra)
    log = (tmp / "restarted.0.log").read_text()
    assert f"was moved to {restarted / 'previous-1'}" in log
    assert "Resuming" not in log  # a fresh run from step 0
    assert sorted(train_losses(restarted)) == list(range(1, STEPS + 1))
    assert train_losses(restarted) != train_losses(two)  # seed 1, not the old run's curve
    old = checkpoints.TrainCheckpoints(restarted / "previous-1" / "checkpoints").all_steps()
    assert old == [3, STEPS]
