"""Every stop resumes exactly on the tf.data path, across process counts, and after a crash.

One chain of real `train.py` runs of the tiny recipe with `data_on_device=False` (each process's
rows of every global batch come from the tf.data pipeline as numpy, then `make_global_batch`):
a 2-process run stopped by SIGTERM, resumed as 1 process, stopped by SIGINT, by SIGTERM, crashed by
an exception injected at a step, and finished, each leg with other harmless fields
(`workdir.HARMLESS`). It ends with the uninterrupted run's final params, bit for bit, and its
final line. The moments are drawn from a seeded generator (the step a signal lands at also
depends on timing; the result may not).

Bit for bit across process counts holds here because both topologies have 2 devices in all
(2 processes x 1, 1 process x 2): each cross-device sum has two operands, and a + b == b + a
exactly in IEEE arithmetic, so the order the collective adds them in cannot matter (measured:
max |diff| 0.0 for the params and every step's loss after 48 steps). With 3+ devices the order
of the sum does change the rounding: tests/test_multiprocess.py compares 2 x 2 with 1 x 4 within
a tolerance for that reason. The on-device path's signal chain is tests/test_stop_signals.py;
SIGKILL (what an `os._exit` crash does to a run: no clean-up) is in its chain too.
"""

from __future__ import annotations

import itertools
import random
import signal
import subprocess
import sys
import threading

import pytest
from helpers import COMPILE_CACHE, REPO, assert_params_identical, free_port
from test_multiprocess import TINY, child_env, coordinator_flags

from vit_jax import trained
from vit_jax.train import dispatch, workdir

pytestmark = pytest.mark.slow  # seven train.py processes

TIMEOUT_S = 600  # per leg (all its processes); ~15 s each on idle cores
STEPS = 120  # long enough that every stop below lands well before the end
BASE = [f"--config.total_steps={STEPS}", "--config.data_on_device=False"]
REFERENCE = {"steps_per_dispatch": 8, "log_every_steps": 50, "checkpoint_every_steps": 0}
# The legs, in order: (processes, devices per process, the harmless fields it changes, its stop).
LEGS = [
    (2, 1, {"steps_per_dispatch": 1, "log_every_steps": 1, "checkpoint_every_steps": 0}, "SIGTERM"),
    (
        1,
        2,
        {"log_every_steps": 4, "checkpoint_every_steps": 10, "keep_checkpoints": 1},
        "SIGINT",
    ),
    (
        1,
        2,
        {
            "steps_per_dispatch": 1,
            "log_every_steps": 1,
            "checkpoint_every_steps": 7,
            "async_checkpoints": False,
            "eval_every_steps": 25,
        },
        "SIGTERM",
    ),
    (1, 2, {"log_every_steps": 3, "checkpoint_every_steps": 7, "prefetch_to_device": 2}, "crash"),
    (1, 2, {"log_every_steps": 50, "eval_batch_size": 120, "steps_per_dispatch": 4}, None),
]
EXIT_STATUS = {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9, "crash": 1, None: 0}

# Runs train.py with an exception raised once the dispatch holding step $CRASH_AT_STEP has run
# (before the loop counts it): a bug or a lost device in the middle of training. The loop's
# clean-up still runs, as it would for a real error; the newest committed checkpoint is what a
# rerun resumes from.
CRASH = """
import os, runpy, sys
from vit_jax.train import loss_watch
crash_at, add = int(os.environ["CRASH_AT_STEP"]), loss_watch.LossWatch.add
def crashing_add(self, step, loss, count=None):
    if step + (count or 1) - 1 >= crash_at:
        raise RuntimeError(f"injected crash at step {crash_at}")
    return add(self, step, loss, count)
loss_watch.LossWatch.add = crashing_add
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _progress_step(line: str) -> int | None:
    if line.startswith("step ") and "/" in line.split()[1]:
        return int(line.split()[1].split("/")[0])
    return None


def run_leg(
    work, name, processes, devices, fields, data_dir, stop=None, at=0, crash_at=None, base=BASE
):
    """`train.py` of the chain's config (`base`) + `fields` in `work` on `processes` x `devices`; `stop`
    ('SIGTERM' / 'SIGINT') is sent to the last process once process 0 printed step `at`.
    Returns (exit statuses, process 0's stdout, process 0's stderr). Every process is killed (by
    its own PID) if the leg overruns TIMEOUT_S."""
    port, procs, logs = free_port(), [], []
    extra = [f"--config.{k}={v}" for k, v in fields.items()]
    for i in range(processes):
        args = [
            "train.py",
            f"--config={REPO / 'configs' / 'digits.py'}:tiny",
            f"--workdir={work}",
            f"--config.data_dir={data_dir}",
            *TINY,
            *base,
            *extra,
            *coordinator_flags(port, processes, i),
        ]
        env = child_env(devices, COMPILE_CACHE)
        if crash_at is not None:
            args, env = ["-c", CRASH, *args], {**env, "CRASH_AT_STEP": str(crash_at)}
        logs.append(open(work.parent / f"{name}.{i}.err", "w+"))  # noqa: SIM115 (closed below)
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE if i == 0 else logs[i],
                stderr=logs[i],
                text=True,
            )
        )
    watchdog = threading.Timer(TIMEOUT_S, lambda: [p.kill() for p in procs if p.poll() is None])
    watchdog.start()
    try:
        lines = []
        for line in procs[0].stdout:
            lines.append(line)
            step = _progress_step(line)
            if stop and step is not None and step >= at:
                procs[-1].send_signal(getattr(signal, stop))
                stop = None
        statuses = [p.wait(timeout=TIMEOUT_S) for p in procs]
        logs[0].seek(0)
        return statuses, "".join(lines), logs[0].read()
    finally:
        watchdog.cancel()
        for p in procs:  # only the children started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def run_chain(tmp, legs, reference_fields, data_dir, base=BASE, topology=(1, 2)):
    """The uninterrupted reference (on `topology`: processes, devices each; started beside the
    first leg) and the stopped chain of `legs`:
    {'reference': ..., 'legs': [(statuses, out, err, moment)], 'work': ..., 'tmp': ...}."""
    reference = {}

    def run_reference():
        reference["result"] = run_leg(
            tmp / "reference", "reference", *topology, reference_fields, data_dir, base=base
        )

    beside = threading.Thread(target=run_reference)
    beside.start()
    work, rng, newest, results = tmp / "w", random.Random(24), 0, []
    try:
        for n, (processes, devices, fields, stop) in enumerate(legs):
            at = newest + rng.randrange(3, 15)  # seeded: the same moments on every run
            crash_at = at if stop == "crash" else None
            signal_name = stop if stop in ("SIGTERM", "SIGINT", "SIGKILL") else None
            result = run_leg(
                work,
                f"leg{n}",
                processes,
                devices,
                fields,
                data_dir,
                signal_name,
                at,
                crash_at,
                base,
            )
            results.append((*result, {"at": at, "resumed_from": newest}))
            newest = workdir.latest_checkpoint_step(str(work)) or 0
    finally:
        beside.join(timeout=2 * TIMEOUT_S)
    return {"reference": reference["result"], "legs": results, "work": work, "tmp": tmp}


def check_legs(legs, chain, steps=STEPS) -> None:
    """Each leg of `chain` (run from `legs`, `steps` in all) stopped as asked and resumed where
    the last one saved (a SIGKILL: its exit status alone, nothing runs after it)."""
    for (processes, _, _, stop), (statuses, out, err, moment) in zip(
        legs, chain["legs"], strict=True
    ):
        assert statuses == [EXIT_STATUS[stop]] * processes, (moment, out[-2000:], err[-2000:])
        if moment["resumed_from"]:
            assert f"Resuming from the checkpoint of step {moment['resumed_from']}" in out, moment
        last = out.strip().splitlines()[-1]
        if stop in ("SIGTERM", "SIGINT"):
            assert last.startswith(f"Stopped by {stop} at step "), (moment, last)
            stopped_at = int(last.split("at step ")[1].split()[0])
            assert moment["at"] <= stopped_at < steps, moment
        elif stop == "crash":
            assert err.strip().splitlines()[-1].startswith("FATAL"), err[-2000:]
            assert f"injected crash at step {moment['at']}" in err


def check_ends_like_the_reference(chain) -> None:
    """The chain's final line and params are the uninterrupted run's, bit for bit."""
    statuses, ref_out, ref_err = chain["reference"]
    assert statuses == [0], ref_err[-2000:]
    _, out, _, _ = chain["legs"][-1]
    reference_line = ref_out.strip().splitlines()[-1]
    assert reference_line.startswith("Final test accuracy")
    assert out.strip().splitlines()[-1] == reference_line
    assert_params_identical(
        trained.read_model(str(chain["work"]))[1],
        trained.read_model(str(chain["tmp"] / "reference"))[1],
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits_data_dir):
    return run_chain(tmp_path_factory.mktemp("exact_resume"), LEGS, REFERENCE, digits_data_dir)


def test_each_leg_stops_as_asked_and_resumes_where_the_last_one_saved(chain):
    check_legs(LEGS, chain)


def test_the_two_process_leg_resumes_as_one_process_with_the_global_order(chain):
    _, out, _, moment = chain["legs"][1]
    assert moment["resumed_from"], moment  # the 2-process leg saved where SIGTERM stopped it
    assert "Resuming a 2-process checkpoint on 1 process(es): the data order is global" in out


def test_the_crash_loses_only_the_steps_after_the_newest_checkpoint(chain):
    _, _, fields, _ = LEGS[3]
    _, _, _, crashed = chain["legs"][3]
    _, _, _, finished = chain["legs"][4]
    # The crash leg's dispatches (as the trainer plans them): the one holding the crash step
    # ran but never finished; every checkpoint before it (every 7 steps) was committed.
    start = crashed["resumed_from"]
    boundaries = [fields[k] for k in ("log_every_steps", "checkpoint_every_steps")]
    ends = itertools.accumulate(
        dispatch.plan(start, STEPS, fields.get("steps_per_dispatch", 8), boundaries),
        initial=start,
    )
    completed = [end for end in ends if end < crashed["at"]]
    saved = [s for s in completed if s % fields["checkpoint_every_steps"] == 0 and s > start]
    assert finished["resumed_from"] == max([start, *saved]), (crashed, finished)


def test_the_stopped_chain_ends_exactly_where_the_uninterrupted_run_ends(chain):
    check_ends_like_the_reference(chain)


def test_every_leg_changes_only_harmless_fields():
    for _, _, fields, _ in LEGS:
        assert set(fields) <= set(workdir.HARMLESS), set(fields) - set(workdir.HARMLESS)
