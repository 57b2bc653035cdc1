"""One process per host: JAX's distributed runtime, started before any other JAX call, and checked.

`initialize(...)` is what `train.py` calls first. It starts `jax.distributed` when
  - the three explicit settings are given (bare machines: `--coordinator_address=HOST:PORT
    --num_processes=N --process_id=I` on every host), or
  - JAX can detect the cluster itself: Cloud TPU pod slices, SLURM (`srun`), Open MPI (`mpirun`),
    Kubernetes, or `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) in the
    environment,
and leaves a single process alone otherwise. Initialization waits at most `init_timeout_s` for the
other processes, and a process that stops answering is noticed after `heartbeat_timeout_s`.
At exit every process waits for the others (JAX's shutdown barrier) at most `shutdown_timeout_s`;
then JAX ends them all. A process that fails alone (an error, a Ctrl-C on one host) is still
alive there, answering heartbeats, while the others wait for it in a collective that never ends:
without that bound the job would hang (JAX's default: 300 s), with it the whole job ends.
A scheduler that started several tasks while JAX sees one process is an error: each task would
otherwise train alone, write over the others' files, and nobody would notice.

`check_same_config` and `check_shared_workdir` are the start-up checks every multi-process run
does before touching its workdir (the trainer calls them); `describe(mesh)` is the first log line.
`on_process_0` runs file-system work that must happen once (moving a run or a damaged checkpoint
aside) with the other processes waiting for it, and `processes_where` lets them agree on a verdict.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable

import jax
import numpy as np
from absl import logging


class DistributedError(RuntimeError):
    """The processes of a run cannot start or do not agree; the message says which and why."""


# Environment variables through which schedulers announce how many tasks they started.
_TASK_COUNT_VARS = (
    ("SLURM_STEP_NUM_TASKS", "SLURM (srun)"),
    ("SLURM_NTASKS", "SLURM"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_SIZE", "MPI (PMI)"),
)


def scheduler_task_count() -> tuple[int, str] | None:
    """(tasks, scheduler) when a scheduler says how many copies of this program it started."""
    for var, name in _TASK_COUNT_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value), f"{name} ({var}={value})"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if hosts:
        return len(hosts.split(",")), f"Cloud TPU (TPU_WORKER_HOSTNAMES has {hosts.count(',') + 1})"
    return None


def _cluster_detected() -> str | None:
    """The name of the cluster environment JAX's auto-detection would use, if any."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    from jax._src import clusters  # JAX's own detectors: the same rules initialize() applies

    for cluster in clusters.ClusterEnv._cluster_types:
        if cluster.opt_in_only_method:  # mpi4py: only when asked for by name
            continue
        try:
            if cluster.is_env_present():
                return cluster.__name__
        except Exception:  # a detector probing a metadata server offline: not this cluster
            continue
    return None


def _multi_process_cluster() -> str | None:
    """The detected cluster environment that starts several processes, if any (a scheduler that
    started a single task is a plain single-process run)."""
    cluster = _cluster_detected()
    tasks = scheduler_task_count()
    if cluster is None or (tasks is not None and tasks[0] == 1):
        return None
    return cluster


def multi_process_requested(coordinator_address: str | None, num_processes: int | None) -> bool:
    """Whether `initialize` would start a multi-process run (flags or a detected cluster)."""
    if coordinator_address is not None or (num_processes or 1) > 1:
        return True
    return _multi_process_cluster() is not None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    init_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
    shutdown_timeout_s: int = 60,
) -> None:
    """Starts `jax.distributed` if this is a multi-process run (see the module doc); else nothing.

    Must run before any other JAX call. Raises DistributedError with one clear sentence for
    inconsistent settings, an unreachable coordinator, or a scheduler/JAX disagreement.
    """
    explicit = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if min(init_timeout_s, heartbeat_timeout_s, shutdown_timeout_s) <= 0:
        raise DistributedError(
            f"timeouts must be positive seconds; got --distributed_init_timeout={init_timeout_s}, "
            f"--distributed_heartbeat_timeout={heartbeat_timeout_s}, "
            f"--distributed_shutdown_timeout={shutdown_timeout_s}"
        )
    if given and len(given) != 3:
        missing = [name for name in explicit if name not in given]
        raise DistributedError(
            f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run started by "
            f"hand needs all three (the same --coordinator_address and --num_processes on every "
            f"process, and --process_id 0..N-1, a different one on each)"
        )
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"--process_id={process_id} with --num_processes={num_processes}: the process id "
                f"must be in 0..{max(num_processes, 1) - 1} and the count at least 1"
            )
        port = coordinator_address.rpartition(":")[2]
        if ":" not in coordinator_address or not (port.isdigit() and 0 < int(port) < 65536):
            raise DistributedError(
                f"--coordinator_address={coordinator_address!r} must be HOST:PORT (process 0's "
                f"host and a free port in 1..65535 that every process can reach)"
            )
        how = f"{coordinator_address} (process {process_id} of {num_processes}, from flags)"
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        cluster = _multi_process_cluster()
        if cluster is None:
            _check_task_count()
            return
        how, kwargs = f"auto-detected ({cluster})", {}
    logging.info("Starting jax.distributed: %s", how)
    if given and process_id == 0:
        _check_port_free(coordinator_address)
    elif given:
        # JAX aborts the whole process (no exception) when it cannot reach the coordinator; a
        # plain TCP probe first turns the common case into one clear line, within the timeout.
        started = time.monotonic()
        _wait_for_coordinator(coordinator_address, init_timeout_s)
        init_timeout_s = max(1, int(init_timeout_s - (time.monotonic() - started)))
    try:
        jax.distributed.initialize(
            **kwargs,
            initialization_timeout=init_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except Exception as e:  # JAX's errors are multi-line gRPC reports: keep their first line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"jax.distributed could not start via {how} within {init_timeout_s} s: {first_line}. "
            f"Check that every process was started with the same coordinator address and process "
            f"count, that process 0 is running, and that its port is reachable from this host."
        ) from None
    _check_task_count()


def _check_port_free(address: str) -> None:
    """Raises unless process 0 can host the coordinator at `address`'s port on this host.

    JAX's coordinator (gRPC) binds with SO_REUSEPORT, so a second job given the same port binds
    too, and the kernel then splits the processes' connections between the two coordinators: both
    jobs hang until the init timeout and abort. A plain bind first (SO_REUSEADDR only, which
    passes over closed connections in TIME_WAIT but not over a live socket) names the clash.
    """
    port = int(address.rpartition(":")[2])
    try:
        probe = socket.socket(socket.AF_INET6)  # dual-stack: clashes with IPv4 sockets too
    except OSError:  # a host without IPv6
        probe = socket.socket(socket.AF_INET)
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            raise DistributedError(
                f"--coordinator_address={address!r}: port {port} is already in use on this host "
                f"({e.strerror}), by another job's coordinator or another program. Process 0 "
                f"hosts the coordinator: give every process of this run another free port."
            ) from None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once something listens at `address` (process 0's coordinator); else raises."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"coordinator {address} unreachable for {timeout_s} s "
                    f"(--distributed_init_timeout): {e}. Start process 0 (it hosts the "
                    f"coordinator) with the same --coordinator_address, and check that its host "
                    f"and port are reachable from here."
                ) from None
            time.sleep(0.5)


def _check_task_count() -> None:
    tasks = scheduler_task_count()
    if tasks is not None and tasks[0] != jax.process_count():
        raise DistributedError(
            f"{tasks[1]} started {tasks[0]} tasks but JAX sees {jax.process_count()} "
            f"process(es): each would train alone and overwrite the others' files. Let JAX detect "
            f"the cluster (run under srun / mpirun / the TPU runtime unchanged) or pass "
            f"--coordinator_address, --num_processes and --process_id explicitly."
        )


def barrier(name: str, timeout_s: int = 600) -> None:
    """All processes wait here for each other, through the coordination service (no device work).

    XLA's CPU collectives (gloo) give a process only 30 s to join a new collective, so processes
    that reach their first step far apart (one still compiling on a loaded host) would fail there;
    the trainer compiles the step first and meets here after, so they start it together.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"vit_jax:{name}", timeout_in_ms=timeout_s * 1000)


def on_process_0(name: str, action: Callable[[], object], timeout_s: int = 600) -> str:
    """Runs `action` on process 0 alone; every process returns `str` of its result once it is done.

    The others wait for it (through the coordination service's key-value store, so no 30 s gloo
    limit), then go on; if it failed there, they raise DistributedError carrying process 0's error
    instead of racing ahead on a half-changed workdir or waiting at a later collective forever.
    `name` must be unique within the run.
    """
    if jax.process_count() == 1:
        return str(action())
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    key = f"vit_jax:{name}"
    if jax.process_index() == 0:
        try:
            result = str(action())
        except BaseException as e:
            client.key_value_set(key, f"error:{type(e).__name__}: {e}", allow_overwrite=True)
            raise
        client.key_value_set(key, f"ok:{result}", allow_overwrite=True)
        return result
    status, _, text = client.blocking_key_value_get(key, timeout_s * 1000).partition(":")
    if status != "ok":
        raise DistributedError(f"{name} failed on process 0 ({text}); this process stops as well")
    return text


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes whose `flag` is true (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    flags = _allgather(np.asarray([int(flag)], np.int32))[:, 0]
    return [i for i, f in enumerate(flags) if f]


def describe(mesh: jax.sharding.Mesh) -> str:
    """The run's topology in one line: processes, devices, mesh."""
    return (
        f"Topology: {jax.process_count()} process(es), this is process {jax.process_index()} | "
        f"{jax.local_device_count()} local / {jax.device_count()} global "
        f"{jax.devices()[0].platform} devices | mesh {dict(mesh.shape)}"
    )


def _allgather(value: np.ndarray) -> np.ndarray:
    """Every process's `value` (same shape everywhere), stacked in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def config_hash(config) -> str:
    """A digest of the whole config (sorted JSON), equal on processes that run the same thing."""
    text = config.to_json_best_effort(sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config) -> None:
    """Raises DistributedError naming the processes whose config differs from process 0's."""
    if jax.process_count() == 1:
        return
    mine = config_hash(config)
    digests = _allgather(np.frombuffer(bytes.fromhex(mine), np.uint8))
    differ = [i for i, d in enumerate(digests) if d.tobytes() != digests[0].tobytes()]
    if differ:
        raise DistributedError(
            f"the config differs between processes: process(es) {differ} do not match process 0 "
            f"(this is process {jax.process_index()}, config hash {mine[:12]}); start every "
            f"process with the same --config file and the same --config.* overrides"
        )


def check_shared_workdir(workdir) -> None:
    """Raises DistributedError naming every process that does not see process 0's workdir.

    Process 0 writes a unique token file into the workdir; every process must read the same token
    there. A per-host local path (each host its own disk) fails this instead of silently writing
    checkpoints that no single host holds whole. The token file is removed afterwards.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = uuid.uuid4().hex if jax.process_index() == 0 else "0" * 32
    token = bytes(
        multihost_utils.broadcast_one_to_all(np.frombuffer(bytes.fromhex(token), np.uint8))
    ).hex()
    path = workdir / f".shared-workdir-check-{token}"
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    multihost_utils.sync_global_devices("vit_jax shared workdir: token written")
    try:
        sees = path.exists() and path.read_text() == token
    except OSError:
        sees = False
    seen = _allgather(np.asarray([sees], np.int32))[:, 0]
    multihost_utils.sync_global_devices("vit_jax shared workdir: token read")
    if jax.process_index() == 0:
        path.unlink(missing_ok=True)
    missing = [i for i, ok in enumerate(seen) if not ok]
    if missing:
        raise DistributedError(
            f"workdir {str(workdir)!r} is not shared: process(es) {missing} do not see what "
            f"process 0 wrote there (this is process {jax.process_index()} on "
            f"{socket.gethostname()}). Every process must use one directory on a shared file "
            f"system (NFS, GCS gs://..., a cluster file system)."
        )
