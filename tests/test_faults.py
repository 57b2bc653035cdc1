"""Faults: every failure costs at most the steps since the last checkpoint, none hangs, each ends in
one clear line. Process-level behaviour (signals, exit statuses, a full disk, the workdir lock) runs
real `train.py` processes, each bounded by a timeout and killed by its own PID if it overruns."""

import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from vit_jax import checkpoints, loss_watch, metrics, workdir
from vit_jax.model_config import ViTConfig
from vit_jax.tfds_builders import image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
NOISE = ("oneDNN", "absl::InitializeLog", "FeatureConnector.dtype", "Traceback", "backend 'tpu'")


def train_cmd(config, workdir_path, data_dir, *extra):
    return [
        sys.executable,
        "train.py",
        f"--config={config}",
        f"--workdir={workdir_path}",
        f"--config.data_dir={data_dir}",
        *extra,
    ]


def env():
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": os.path.join(
            tempfile.gettempdir(), f"vit_jax_test_compile_cache_{os.getuid()}"
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def run(cmd, timeout=300, **kwargs):
    return subprocess.run(
        cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def signal_after_step(cmd, signals, step=2, timeout=300):
    """Starts `cmd`, sends `signals` (in order) once it printed `step`, returns (status, out, err).

    A signal after a first Ctrl-C is sent once the process has said it saw that one, as a person
    reads the message before pressing again: two signals that arrive while Python is inside one
    long C call run its handler once (CPython keeps one pending flag per signal, not a count).
    """
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
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


# --- Stops: SIGINT / SIGTERM save and exit 130 / 143; a second Ctrl-C aborts; rerun resumes --------


@pytest.mark.slow  # three train.py processes
def test_ctrl_c_and_sigterm_save_exit_with_shell_status_and_resume(
    tiny_config_path, digits_data_dir, tmp_path
):
    cmd = train_cmd(
        tiny_config_path, tmp_path / "w", digits_data_dir, "--config.total_steps=100000"
    )
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


# --- Storage: a failed save ends the run at once, in one line; earlier checkpoints stay -----------


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_and_keeps_earlier_checkpoints(
    tiny_workdir, tiny_config_path, digits_data_dir, tmp_path
):
    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    cmd = train_cmd(tiny_config_path, work, digits_data_dir, "--config.total_steps=8")

    # A full disk, made real enough: the child's writes past 4 KiB fail with EFBIG (Python ignores
    # SIGXFSZ), so the tiny checkpoint's array file cannot be written. (A wrapper sets the limit
    # and execs train.py: no fork from this multithreaded test process.)
    limit = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    start = time.monotonic()
    result = run([sys.executable, "-c", limit, *cmd[1:]])
    assert result.returncode == 1
    assert result.stderr.strip().startswith("FATAL CheckpointWriteError: could not write")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(work / "checkpoints" / "4") in result.stderr  # the save that failed, named
    assert time.monotonic() - start < 240  # no barrier timeout (Orbax's is 300 s+)
    config, params = checkpoints.read_model(work / "checkpoints" / "3")
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
    writer = metrics.MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 2.0})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # a kill in the middle of an append
    writer = metrics.MetricWriter(tmp_path)
    writer.write(3, "train", {"loss": 1.0})
    writer.close()
    curves = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert curves["train"]["loss"] == [(1, 2.0), (3, 1.0)]
    assert "WARNING skipped 1 unreadable line(s)" in capsys.readouterr().out


# --- Integrity: fingerprints, fallback to the previous intact step, tmp cleanup, keep -------------


def _state(value):
    return {
        "params": {"w": jnp.full((64, 8), value, jnp.float32), "b": jnp.arange(8.0) * value},
        "opt_state": ({"mu": jnp.full((64, 8), value / 2, jnp.bfloat16)},),
        "step": jnp.asarray(int(value), jnp.int32),
    }


def _damage(step_dir: pathlib.Path, how: str):
    state = step_dir / "state"
    if how == "truncate_arrays":
        for path in glob.glob(str(state / "**" / "d" / "*"), recursive=True):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "delete_manifest":
        for path in glob.glob(str(state / "**" / "manifest.ocdbt"), recursive=True):
            os.remove(path)
    elif how == "delete_metadata":
        os.remove(state / "_METADATA")
    elif how == "delete_state":
        shutil.rmtree(state)
    elif how == "garble_fingerprint":  # what garbled bytes that load silently look like
        record = step_dir / "integrity" / "metadata"
        data = json.loads(record.read_text())
        key = sorted(data["arrays"])[0]
        data["arrays"][key] = "deadbeef"
        record.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "how",
    [
        "truncate_arrays",
        "delete_manifest",
        "delete_metadata",
        "delete_state",
        "garble_fingerprint",
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(how, tmp_path):
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), ViTConfig(), {"step": step})
    ckpt.wait()
    _damage(tmp_path / "checkpoints" / "2", how)
    ckpt.close()

    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=3, async_save=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    warnings = []
    state, data_state = ckpt.restore_newest_intact(abstract, warn=warnings.append)
    assert data_state["step"] == 1 and int(state["step"]) == 1
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert len(warnings) == 1 and "checkpoint step 2" in warnings[0] and "damaged" in warnings[0]
    assert (tmp_path / checkpoints.DAMAGED_DIR / "2").is_dir()  # moved aside, not deleted
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_fingerprint_sees_a_single_changed_word():
    from vit_jax import integrity

    fingerprint = integrity.make_fingerprint()
    tree = {"a": jnp.arange(1000, dtype=jnp.float32), "b": jnp.ones((3, 5), jnp.bfloat16)}
    changed = {**tree, "a": tree["a"].at[637].set(637.0001)}
    swapped = {**tree, "a": tree["a"][::-1]}
    base = fingerprint(tree)
    assert fingerprint(tree) == base
    assert fingerprint(changed)["['a']"] != base["['a']"]
    assert fingerprint(swapped)["['a']"] != base["['a']"]  # position matters, not just content
    with pytest.raises(integrity.FingerprintMismatchError, match="'a'"):
        integrity.verify(fingerprint(changed), base)


def test_interrupted_save_leftovers_are_removed_and_keep_never_drops_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "7.orbax-checkpoint-tmp-1234").mkdir(parents=True)
    ckpt = checkpoints.TrainCheckpoints(root, keep=1, async_save=False)
    assert not (root / "7.orbax-checkpoint-tmp-1234").exists()
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), ViTConfig(), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    ckpt.close()
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        checkpoints.TrainCheckpoints(root, keep=0)


def test_nan_message_names_the_newest_checkpoint_not_a_last_good_one(tmp_path):
    watch = loss_watch.LossWatch(tmp_path, latest_saved=4)
    watch.add(5, jnp.asarray(float("nan")))
    with pytest.raises(loss_watch.NonFiniteLossError) as e:
        watch.check()
    assert "the newest checkpoint is step 4" in str(e.value) and "last good" not in str(e.value)


# --- Workdir ownership: lock (stale-aware), refusing another run, nothing written when refused ----


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_is_not_stale(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from vit_jax import workdir; "
            f"w = workdir.Workdir({str(tmp_path / 'w')!r}); w.claim(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        cwd=REPO,
        env=env(),
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
    tiny_workdir, tiny_config_path, digits_data_dir, tmp_path
):
    from vit_jax import trainer

    work = tmp_path / "w"
    shutil.copytree(tiny_workdir, work)
    before = _listing(work)
    config = load_config(tiny_config_path)
    config.data_dir = digits_data_dir
    config.init_from = str(tmp_path / "missing.npz")  # found missing only after the move
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        trainer.train_and_evaluate(config, str(work), restart=True)
    assert _listing(work) == before
    assert not (work / "previous-1").exists()


def test_a_folder_whose_config_json_no_trainer_wrote_is_not_a_workdir(
    tiny_config_path, digits_data_dir, tmp_path
):
    from vit_jax import trainer

    export = tmp_path / "hf_export"  # what `convert --to hf` writes
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    (export / "model.safetensors").write_bytes(b"weights")
    before = _listing(export)
    config = load_config(tiny_config_path)
    config.data_dir = digits_data_dir
    for restart in (False, True):
        with pytest.raises(workdir.WorkdirConflictError, match="is not a training config"):
            trainer.train_and_evaluate(config, str(export), restart=restart)
    assert _listing(export) == before and not (export / ".lock").exists()


# --- Validation of image folders ----------------------------------------------------------------


def _image_folder(root, classes):
    from PIL import Image

    for split in ("train", "test"):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i}.png")


def test_an_image_folder_needs_two_classes_with_images(tmp_path, caplog):
    _image_folder(tmp_path / "one", {"cat": 2})
    with pytest.raises(ValueError, match="1 class"):
        image_folder.scan_folder(str(tmp_path / "one"))
    _image_folder(tmp_path / "empty", {"cat": 2, "dog": 2, "emu": 0})
    listing = image_folder.scan_folder(str(tmp_path / "empty"))
    assert listing.class_names == ("cat", "dog", "emu")
    assert "emu" in caplog.text


# --- Help and --dry_run -------------------------------------------------------------------------


# (command, what its help must name). `vit-*` are the console scripts, run from another directory
# through wrappers written as pip writes them (tests/test_packaging.py installs the real ones).
TRAIN_HELP = ("--config", "--workdir", "--dry_run", "--restart", "--verbose", "143", "130")
HELP = [
    (["train.py", "--helpshort"], (*TRAIN_HELP, "(default: 'false')")),  # the flag list itself
    (["train.py", "--help"], (*TRAIN_HELP, "--coordinator_address")),
    (["train.py", "--helpfull"], (*TRAIN_HELP, "--verbosity")),  # absl's own flags too
    (["vit-train", "--helpshort"], (*TRAIN_HELP, "(default: 'false')")),
    (["-m", "vit_jax.benchmark", "--help"], ("--batch_size", "--variant", "--compare")),
    (["vit-benchmark", "--helpshort"], ("--batch_size", "--variant", "--compare")),
    (["-m", "vit_jax.predict", "--help"], ("--checkpoint", "--top_k", "--verbose")),
    (["vit-predict", "-h"], ("--checkpoint", "--top_k")),
    (["-m", "vit_jax.convert", "--help"], ("--to", "--variant", "--set", "npz", "timm", "hf")),
    (["vit-convert", "--help"], ("--to", "--set")),
    (["-m", "vit_jax.pretrained", "--help"], ("--urls", "model")),
    (["-m", "vit_jax.data.input_benchmark", "--help"], ("--num_batches",)),
]


@pytest.mark.parametrize("argv, names", HELP, ids=[" ".join(a) for a, _ in HELP])
def test_help_exits_0_and_lists_what_matters(argv, names, tmp_path):
    if argv[0].startswith("vit-"):
        import tomllib

        target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][argv[0]]
        module, func = target.split(":")
        script = tmp_path / argv[0]
        script.write_text(f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        cmd, cwd = [sys.executable, str(script), *argv[1:]], tmp_path
    else:
        cmd, cwd = [sys.executable, *argv], REPO
    result = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # help is the answer, not an error
    missing = [name for name in names if name not in result.stdout]
    assert not missing, result.stdout


def test_dry_run_prints_config_and_model_and_touches_nothing(
    tiny_config_path, digits_data_dir, capsys
):
    from vit_jax import summary

    config = load_config(tiny_config_path)
    config.data_dir = digits_data_dir
    summary.print_dry_run(config)
    out = capsys.readouterr().out
    assert '"batch_size": 32' in out
    assert "parameters: 11,082" in out and "tokens per image: 17" in out
    assert "GFLOPs per image" in out and "nothing was trained or written" in out
    assert f"on mesh {{'data': {jax.device_count()}, 'fsdp': 1}}" in out


def test_dry_run_checks_the_mesh_and_downloads_nothing(tiny_config_path, tmp_path, capsys):
    from vit_jax import summary

    config = load_config(tiny_config_path)
    config.mesh.data = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"needs {jax.device_count() + 1} devices"):
        summary.print_dry_run(config)
    config = load_config(tiny_config_path)
    config.dataset, config.data_dir = "cifar10", str(tmp_path)  # not prepared there
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared.*does not download"):
        summary.print_dry_run(config)
    assert list(tmp_path.iterdir()) == [] and "nothing was" not in capsys.readouterr().out
