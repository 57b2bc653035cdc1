"""Who owns a workdir: one trainer at a time, one run per workdir, nothing changed by a refused start.

A start goes through three stages (`trainer.train_and_evaluate` calls them in this order):
  checks    `check_start(...)`: writable, not in use (lock), the config agrees with the run already
            in the workdir (only harmless fields may differ), and its length does not end before
            the newest checkpoint. Reads only.
  claim     `claim()`: takes the lock (creating the workdir if needed) and, with `restart`, moves
            the previous run aside to `<workdir>/previous-<n>/` (nothing is deleted).
  commit    `commit(config)`: writes config.json, once everything that can refuse has passed.
A failure between claim and commit undoes the claim (`abandon()`): the lock file and a workdir that
this start created are removed and a run moved aside by `restart` is moved back, so a refused start
leaves the workdir as it was.

The lock is `fcntl.flock` on `<workdir>/.lock`: the kernel releases it when its process dies, so a
killed trainer never leaves a stale lock; the file says which process holds it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import time
from typing import Any

from absl import logging

from vit_jax import integrity

# The harmless fields, the one list of them: a resumed run may change each. Each changes how a run
# is watched, stored or fed, never a bit of what it trains: the params and per-step losses are
# identical with any value (tests/test_harmless_fields.py and tests/test_stop_signals.py run each
# changed and compare bit for bit).
HARMLESS = (
    "log_every_steps",  # intervals: the steps where the loop looks at the state, ...
    "eval_every_steps",
    "checkpoint_every_steps",
    "steps_per_dispatch",  # ... and the steps per call: one compiled step body (train/dispatch.py)
    "keep_checkpoints",  # what is kept / how it is written
    "async_checkpoints",
    "prefetch_to_device",  # how far ahead batches are copied
    "data_dir",  # where the same dataset is read from
    "eval_batch_size",  # evaluation only (its loss sum may round differently; top-k counts not)
    "eval_split",  # which split evaluation reports on
    "init_from",  # a resumed run starts from its own checkpoint, never from init_from
    "fewshot.",  # few-shot evaluation (train/fewshot_loop.py): reads the params, changes none
)
# `ema_decay` is not harmless: the EMA weights are part of the train state and of what a run
# yields (load_pretrained reads them by default), so a resume may not change it, nor turn it on
# or off (the checkpoint's state would lack, or have, 'ema_params').
# Fields added after workdirs already existed, with the value that means "as before": a
# config.json without the field was written by a run that had this value.
# `distill.*` is not harmless either: the teacher and the loss are what the student trains on.
ADDED_LATER = {
    "ema_decay": 0.0,
    "distill.teacher": "",  # no distillation
    "distill.pretrained": "",
    "distill.kind": "soft",
    "distill.temperature": 1.0,
    "distill.weight": 0.5,
    "distill.bf16": False,
    "pp.rotate_degrees": 0.0,
    "pp.scale_range": None,
}
# Fields a resumed run may also change although they change the numbers by float rounding: the
# device count and layout (the order of the gradient sums across devices) and gradient
# accumulation (the order of the micro-batch sums; with dropout or stochastic depth it also draws
# other masks). A preempted job may come back on other hardware, so they are accepted, with one
# WARNING naming each (`rounding_differences`).
ROUNDING = ("mesh.", "cpu_devices", "fsdp_min_size", "accum_steps")
LENGTH = ("total_steps", "total_epochs")
# Keys every config.json a trainer writes has (and an exported model's config.json has not).
TRAINING_CONFIG_KEYS = frozenset({"dataset", "model", "optim", "batch_size"})
MOVED_ASIDE = (
    "checkpoints",
    "checkpoints-damaged",
    "metrics.jsonl",
    "config.json",
    "curves.png",
)


class WorkdirConflictError(ValueError):
    """The workdir holds another run, or is in use; the message says the ways on."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved_length(config: dict, num_train_examples: int) -> int | None:
    steps, epochs = config.get("total_steps") or None, config.get("total_epochs") or None
    if steps:
        return int(steps)
    if epochs and config.get("batch_size"):
        return math.ceil(epochs * num_train_examples / config["batch_size"])
    return None


def _listed(key: str, fields) -> bool:
    return key in fields or any(f.endswith(".") and key.startswith(f) for f in fields)


def _changed(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    old_flat, new_flat = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(old_flat) | set(new_flat)):
        a = old_flat.get(key, ADDED_LATER.get(key, "<unset>"))
        b = new_flat.get(key, ADDED_LATER.get(key, "<unset>"))
        if _normalized(a) != _normalized(b):
            changed.append((key, a, b))
    return changed


def config_differences(old: dict, new: dict) -> list[str]:
    """'field old → new' for every field that differs and that a resume may not change: neither
    HARMLESS nor ROUNDING (length aside)."""
    return [
        f"{key} {a!r} → {b!r}"
        for key, a, b in _changed(old, new)
        if key not in LENGTH and not _listed(key, HARMLESS) and not _listed(key, ROUNDING)
    ]


def rounding_differences(old: dict, new: dict) -> list[str]:
    """'field old → new' for every ROUNDING field that differs."""
    return [f"{key} {a!r} → {b!r}" for key, a, b in _changed(old, new) if _listed(key, ROUNDING)]


def _normalized(value):
    return [_normalized(v) for v in value] if isinstance(value, list | tuple) else value


def latest_checkpoint_step(workdir: str) -> int | None:
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(n) for n in os.listdir(root) if n.isdigit()]
    return max(steps) if steps else None


class Workdir:
    """The start-up stages of one trainer in `path` (see the module docstring)."""

    def __init__(self, path: str, *, restart: bool = False, main_process: bool = True):
        self.path = str(path)
        self.restart = restart
        self.main_process = main_process
        self.remote = "://" in self.path
        self._lock_file = None
        self._created: list[str] = []
        self._moved: list[str] = []  # names moved into moved_to by this start's claim
        self.moved_to: str | None = None

    # -- checks (read only) -------------------------------------------------------------------

    def check_writable(self) -> None:
        integrity.check_writable(self.path)

    def check_not_in_use(self) -> None:
        """Refuses a workdir whose lock a live trainer holds. Every process of a run probes (so
        all of them stop, not only process 0), at the same moment: with a shared lock, so that
        two probes never take each other for a trainer; a trainer holds it exclusively."""
        if self.remote or not os.path.exists(self._lock_path):
            return
        fd = os.open(self._lock_path, os.O_RDONLY)
        try:
            self._try_lock(fd, shared=True)
        finally:
            os.close(fd)  # closing releases the probe's lock

    def check_config(self, config_json: str, total_steps: int, num_train_examples: int) -> None:
        """Refuses a config that would mix two runs, or a length ending before the checkpoint."""
        if self.remote:
            return
        saved_path = os.path.join(self.path, "config.json")
        self._check_config_json_is_a_run(saved_path)
        if self.restart:
            return
        step = latest_checkpoint_step(self.path)
        if step is None:
            return  # nothing trained here yet: the new config simply takes over
        ways = (
            f"use a new --workdir; or rerun with --restart to start over here (the old run is "
            f"moved to {self.path}/previous-<n>/); or fine-tune from it in a new workdir with "
            f"--config.init_from={self.path}"
        )
        if total_steps < step:
            raise WorkdirConflictError(
                f"the run is {total_steps} steps long but workdir {self.path} already has a "
                f"checkpoint at step {step}: give a length of at least {step} steps; {ways}"
            )
        if os.path.exists(saved_path):
            try:
                old = json.loads(pathlib.Path(saved_path).read_text())
            except (OSError, ValueError) as e:
                raise WorkdirConflictError(
                    f"{saved_path} cannot be read ({e}), so this run cannot be compared: {ways}"
                ) from None
            new = json.loads(config_json)
            differ = config_differences(old, new)
            old_length = resolved_length(old, num_train_examples)
            if old_length is not None and total_steps < old_length:  # (still >= step)
                differ.append(f"length {old_length} → {total_steps} steps (shortened)")
            if differ:
                raise WorkdirConflictError(
                    f"workdir {self.path} holds a run (checkpoint at step {step}) with a different "
                    f"config: {'; '.join(differ)}. Resuming would mix two runs: {ways}"
                )
            if rounding := rounding_differences(old, new):
                logging.warning(
                    "Resuming with %s: allowed, but from here on the numbers differ from an "
                    "uninterrupted run by float rounding (device layout or gradient accumulation)",
                    "; ".join(rounding),
                )

    def _check_config_json_is_a_run(self, saved_path: str) -> None:
        """A config.json that no trainer wrote (an exported Hugging Face model, say) is never
        overwritten, nor is its folder used: it is not a workdir."""
        if not os.path.isfile(saved_path):
            return
        try:
            saved = json.loads(pathlib.Path(saved_path).read_text())
        except (OSError, ValueError):
            return  # unreadable: named below when a run would resume from it
        if not (isinstance(saved, dict) and saved.keys() >= TRAINING_CONFIG_KEYS):
            keys = ", ".join(sorted(saved)[:5]) if isinstance(saved, dict) else type(saved).__name__
            raise WorkdirConflictError(
                f"{saved_path} is not a training config (it holds {keys}...; a workdir's has "
                f"{', '.join(sorted(TRAINING_CONFIG_KEYS))}): {self.path} is not a workdir and "
                f"nothing in it is overwritten; use another --workdir"
            )

    # -- claim / commit / abandon -------------------------------------------------------------

    @property
    def _lock_path(self) -> str:
        return os.path.join(self.path, ".lock")

    def claim(self) -> None:
        if self.remote or not self.main_process:
            return
        missing = []
        path = self.path
        while not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(self.path, exist_ok=True)
        self._created.extend(reversed(missing))  # deepest last: removed first by abandon()
        created_lock = not os.path.exists(self._lock_path)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if created_lock:
            self._created.append(self._lock_path)
        self._lock_file = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode())
        if self.restart:
            self._move_previous_run_aside()

    def _try_lock(self, fd: int, shared: bool = False) -> None:
        import fcntl

        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = pathlib.Path(self._lock_path).read_text().strip() or "another process"
            raise WorkdirConflictError(
                f"workdir {self.path} is in use by another trainer ({holder}); wait for it to "
                f"finish or use another --workdir"
            ) from None
        except OSError:
            pass  # a file system without locks: run unlocked rather than not at all

    def _move_previous_run_aside(self) -> None:
        present = [n for n in os.listdir(self.path) if n in MOVED_ASIDE or n.startswith("events.")]
        if not present:
            return
        n = 1
        while os.path.exists(os.path.join(self.path, f"previous-{n}")):
            n += 1
        target = os.path.join(self.path, f"previous-{n}")
        os.makedirs(target)
        self.moved_to = target
        for name in present:
            os.rename(os.path.join(self.path, name), os.path.join(target, name))
            self._moved.append(name)

    def commit(self, config_json: str) -> None:
        """Writes config.json (atomically: a crash never leaves half a file)."""
        if self.remote:
            from etils import epath

            epath.Path(self.path).mkdir(parents=True, exist_ok=True)
            (epath.Path(self.path) / "config.json").write_text(config_json)
            return
        if not self.main_process:
            return
        tmp = os.path.join(self.path, f".config.json.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(config_json)
        os.replace(tmp, os.path.join(self.path, "config.json"))
        self._created, self._moved = [], []  # committed: nothing to undo any more

    def abandon(self) -> None:
        """Undoes `claim` after a refused start: moves a run it moved aside back, then removes what
        it created (only if still empty)."""
        self._move_previous_run_back()
        self.release()
        for path in reversed(self._created):
            try:
                if os.path.isdir(path):
                    os.rmdir(path)  # only if empty: never removes anything else
                else:
                    os.remove(path)
            except OSError:
                pass
        self._created = []

    def _move_previous_run_back(self) -> None:
        paths = [os.path.join(self.path, name) for name in self._moved]
        # Only an empty folder the refused start made (checkpoints/) may be in the way; anything
        # else and the old run stays where it was moved, whole.
        if not paths or any(os.path.lexists(p) and not _empty_dir(p) for p in paths):
            return
        try:
            for name, here in zip(self._moved, paths):
                if os.path.isdir(here):
                    os.rmdir(here)
                os.rename(os.path.join(self.moved_to, name), here)
            os.rmdir(self.moved_to)
        except OSError:
            return  # (abandon runs while the refusal's own error propagates: that one is shown)
        self._moved, self.moved_to = [], None

    def release(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None


def _empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
