"""vit_jax.distributed start-up and the trainer's bad-input checks: clear errors before any step.

The multi-process runs themselves are in test_multiprocess.py; here everything is one process.
"""

import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import ml_collections
import pytest
from helpers import REPO, free_port, run_with_devices, subprocess_env

from vit_jax import distributed
from vit_jax.tools import cpu_devices


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_processes=2), "given without --coordinator_address, --process_id"),
        (dict(coordinator_address="h:1", process_id=0), "without --num_processes"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "must be in 0..1"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "must be in 0..1"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "at least 1"),
        (dict(coordinator_address="host", num_processes=2, process_id=0), "must be HOST:PORT"),
        (dict(coordinator_address="host:80a", num_processes=2, process_id=1), "must be HOST:PORT"),
        (dict(coordinator_address="host:0", num_processes=2, process_id=1), "in 1..65535"),
        (dict(init_timeout_s=0), "timeouts must be positive"),
        (dict(shutdown_timeout_s=-5), "--distributed_shutdown_timeout=-5"),
    ],
)
def test_inconsistent_flags_are_refused_before_jax_starts(kwargs, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


@pytest.fixture
def no_cluster(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(var, raising=False)
    for var, _ in distributed._TASK_COUNT_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)


def test_single_process_without_a_scheduler_starts_nothing(no_cluster):
    distributed.initialize()  # nothing to do, nothing raised
    assert distributed.scheduler_task_count() is None


@pytest.mark.parametrize(
    "var, value, scheduler",
    [("SLURM_NTASKS", "4", "SLURM"), ("OMPI_COMM_WORLD_SIZE", "2", "Open MPI")],
)
def test_scheduler_with_several_tasks_but_one_jax_process_is_an_error(
    no_cluster, monkeypatch, var, value, scheduler
):
    # e.g. `sbatch --ntasks=4` running `python train.py` once, without srun: JAX cannot detect the
    # cluster, and each task would silently train alone.
    monkeypatch.setenv(var, value)
    with pytest.raises(distributed.DistributedError, match=f"{scheduler}.*started {value} tasks"):
        distributed.initialize()


# What `srun` sets for its tasks (all of them: JAX's SLURM detection wants each), less the count.
SLURM_TASK = dict(
    SLURM_JOB_ID="1234", SLURM_STEP_NODELIST="node1", SLURM_PROCID="0", SLURM_LOCALID="0"
)


def test_one_task_under_a_scheduler_is_a_plain_single_process_run(no_cluster, monkeypatch):
    for var, value in SLURM_TASK.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.multi_process_requested(None, None)  # JAX would see this SLURM job
    monkeypatch.setenv("SLURM_NTASKS", "1")  # `srun -n 1 python train.py`: one task
    assert not distributed.multi_process_requested(None, None)
    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: started.append(k))
    distributed.initialize()  # no error: one task and one JAX process agree
    assert started == []  # jax.distributed is not started: there is nobody to wait for
    assert distributed.scheduler_task_count() == (1, "SLURM (SLURM_NTASKS=1)")
    assert jax.process_count() == 1


def _devices_config(**fields):
    from configs import common

    config = common.get_config()
    config.update(fields)
    return config


@pytest.mark.parametrize(
    "fields, cores, devices",
    [
        (dict(batch_size=64, eval_batch_size=360), 2, 2),  # digits on this machine: one per core
        (dict(batch_size=64, eval_batch_size=360), 16, 8),  # 360 is not a multiple of 16
        (dict(batch_size=64, accum_steps=8, eval_batch_size=64), 16, 8),  # micro-batch of 8
        (dict(batch_size=63, eval_batch_size=63), 2, 1),
        (dict(batch_size=64, mesh=dict(data=2, fsdp=1)), 8, 2),  # a fixed mesh: its own count
        (dict(batch_size=64, mesh=dict(data=3, fsdp=1)), 2, 3),  # (its batch check names 64 / 3)
        (dict(batch_size=64, eval_batch_size=360, mesh=dict(data=-1, fsdp=2)), 2, 2),
        (dict(batch_size=64, eval_batch_size=360, mesh=dict(data=-1, fsdp=2)), 16, 8),
        (dict(batch_size=64, eval_batch_size=360, mesh=dict(data=-1, fsdp=4)), 2, 4),
        (dict(batch_size=64, cpu_devices=3), 2, 3),  # asked for: as given
    ],
)
def test_cpu_devices_auto_takes_one_per_core_that_the_batches_allow(fields, cores, devices):
    assert cpu_devices.count_for_config(_devices_config(**fields), cores) == devices


def test_cpu_devices_bad_value_is_named():
    with pytest.raises(ValueError, match=r"config.cpu_devices=-2: 0 \(one per core\) or a"):
        cpu_devices.count_for_config(_devices_config(cpu_devices=-2), 2)
    with pytest.raises(ValueError, match=r"cpu_devices='2': 0 \(one per core\) or a device"):
        cpu_devices.count("2", [64], 2)


def test_cpu_devices_leave_the_environment_and_multi_process_auto_alone(monkeypatch, no_cluster):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert cpu_devices.use(2) is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
    assert cpu_devices.use(2) is None
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES")
    assert cpu_devices.use(2, auto=True, multi_process=True) is None
    jax.devices()  # JAX has started in this process: its devices stay as they are
    assert cpu_devices.use(jax.device_count() + 1) is None
    assert distributed.multi_process_requested("h:1", 2) is True
    assert distributed.multi_process_requested(None, None) is False


def test_config_hash_sees_any_difference():
    a = ml_collections.ConfigDict({"seed": 0, "optim": {"learning_rate": 1e-3}})
    b = ml_collections.ConfigDict({"optim": {"learning_rate": 1e-3}, "seed": 0})
    c = ml_collections.ConfigDict({"seed": 0, "optim": {"learning_rate": 2e-3}})
    assert distributed.config_hash(a) == distributed.config_hash(b)  # order does not matter
    assert distributed.config_hash(a) != distributed.config_hash(c)


def test_unreachable_coordinator_is_one_line_after_a_bounded_wait(tmp_path):
    workdir = tmp_path / "w"
    args = [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / 'configs' / 'digits.py'}",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{free_port()}",  # nothing listens there
        "--num_processes=2",
        "--process_id=1",
        "--distributed_init_timeout=3",
    ]
    env = subprocess_env(import_checkout=True)
    start = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    waited = time.monotonic() - start
    assert proc.returncode != 0
    fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and "unreachable for 3 s" in fatal[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()
    assert waited < 240  # bounded (most of it is Python start-up on a loaded machine)


def test_a_coordinator_port_already_in_use_is_named_before_jax_starts(no_cluster, monkeypatch):
    # gRPC binds with SO_REUSEPORT, so without this check a second job's coordinator on the same
    # port would bind too and both jobs would hang until the init timeout.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # Were the check missing, JAX would wait for a process 1 and abort this one.
        monkeypatch.setattr(jax.distributed, "initialize", mock.Mock(side_effect=AssertionError))
        with pytest.raises(distributed.DistributedError, match=f"port {port} is already in use"):
            distributed.initialize(f"127.0.0.1:{port}", 2, 0, init_timeout_s=5)
    assert jax.process_count() == 1  # nothing was started


BAD_MESH_AND_BATCH = """
import pathlib, sys
sys.path.insert(0, {root!r})
import jax
from configs import digits
from vit_jax.train import trainer
assert jax.device_count() == 4
workdir = pathlib.Path({workdir!r})
for field, value, message in [
    ("mesh.data", 3, "needs 3 devices but there are 4"),
    ("batch_size", 6, "batch_size=6 must be a positive multiple of the 4 devices"),
]:
    config = digits.get_config()
    config.data_dir = {data_dir!r}
    if field == "mesh.data":
        config.mesh.data = value
    else:
        config.batch_size = value
    try:
        trainer.train_and_evaluate(config, workdir)
    except ValueError as e:
        assert message in str(e), str(e)
    else:
        raise AssertionError("no error for " + field)
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"], list(workdir.iterdir())
print("OK")
"""


def test_mesh_and_batch_that_do_not_fit_the_devices_fail_before_anything_is_written(
    tmp_path, digits_data_dir
):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("the user's")
    code = BAD_MESH_AND_BATCH.format(root=str(REPO), workdir=str(workdir), data_dir=digits_data_dir)
    assert run_with_devices(code, devices=4).strip().endswith("OK")
    assert (workdir / "keep.txt").read_text() == "the user's"


@pytest.mark.parametrize(
    "order, expected",
    [("global", "continues exactly as it would have"), ("per_process", "examples seen from here")],
)
def test_resuming_on_another_process_count_says_whether_it_is_exact(
    order, expected, capsys, caplog
):
    from vit_jax.train import state as train_state

    train_state.warn_on_topology_change({"process_count": 4, "order": order, "step": 10})
    assert expected in capsys.readouterr().out + caplog.text
    caplog.clear()
    train_state.warn_on_topology_change(
        {"process_count": 1, "order": order, "step": 10}
    )  # same count
    assert capsys.readouterr().out == "" and caplog.text == ""
