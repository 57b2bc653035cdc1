"""Orbax checkpoints of a training run: save and resume (reading a model back: `vit_jax.trained`).

Layout: `<workdir>/checkpoints/<step>/` holds these items:
  state         {'params', 'opt_state', 'step'} (+ 'ema_params' when the run kept an EMA of the
                weights, `config.ema_decay`): the arrays, sharded as they were (OCDBT/Zarr);
  model_config  JSON of `ViTConfig.to_dict()`, so a checkpoint says what model it belongs to;
  preprocessing JSON of `vit_jax.interop.input_convention.Preprocessing.to_dict()`: the input convention;
  data_state    JSON, e.g. {"step": 1200, "order": "global", "process_count": 2, ...}: where the
                input pipeline resumes, and the topology that wrote it;
  integrity     JSON: a fingerprint of every array of `state`, a copy of `data_state` (both
                verified on restore) and the run's numerics fingerprint (versions, devices, CPU
                features; see `vit_jax.integrity`): a resume on another one is warned about.
Every process calls save/restore (Orbax coordinates the hosts; each writes its own shards).

Damage: restoring (`restore_newest_intact`) tries the steps newest first; a step that cannot be
read or whose fingerprint does not match is reported in one warning line, moved aside to
`<workdir>/checkpoints-damaged/<step>` and the previous complete one is used. Orbax's temporary
directories of an interrupted save are removed when the manager starts.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vit_jax import distributed, integrity
from vit_jax.model.config import ViTConfig

ITEMS = ("state", "model_config", "preprocessing", "data_state", "integrity")
DAMAGED_DIR = "checkpoints-damaged"  # sibling of checkpoints/: out of Orbax's step listing


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only, permission): path and cause."""


class DamagedCheckpointError(ValueError):
    """No checkpoint in the directory could be restored intact."""


class TrainCheckpoints:
    """An `ocp.CheckpointManager` of train states, keeping the newest `keep` steps.

    Saving is asynchronous when `async_save`: `save` returns once the arrays are copied off the
    devices (so the next, donating train step may overwrite them) and the files are written in the
    background; `wait()` blocks until they are committed.
    """

    def __init__(self, directory: str | epath.Path, *, keep: int = 3, async_save: bool = True):
        if not isinstance(keep, int) or keep < 1:
            # Orbax's max_to_keep=0 deletes every checkpoint, the final model included.
            raise ValueError(f"keep_checkpoints={keep!r} is invalid: must be an int >= 1")
        self.directory = absolute_path(directory)
        _remove_interrupted_saves(self.directory)
        self._fingerprint = None
        self._numerics = None
        self._started: list[int] = []
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # The directory is made by the first save, so a refused start leaves no trace.
            create=False,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            # The trainer decides when to save (interval, end, preemption); Orbax keeps every one.
            save_interval_steps=1,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: dict,
        model_config: ViTConfig,
        data_state: dict[str, Any],
        preprocessing: dict[str, Any] | None = None,
    ) -> None:
        """Starts writing `step`; raises CheckpointWriteError (path and cause) if it cannot.

        An earlier asynchronous save that failed is reported here too, before anything new starts.
        """
        self.check_for_errors()
        try:
            integrity.check_writable(self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._write_error(step, e) from None
        if self._numerics is None:
            self._numerics = integrity.numerics_fingerprint()
        record = {
            "arrays": self._fingerprint_of(state),
            "data_state": data_state,
            "numerics": self._numerics,
        }
        self._started.append(step)
        try:
            items = dict(
                state=ocp.args.StandardSave(state),
                model_config=ocp.args.JsonSave(model_config.to_dict()),
                data_state=ocp.args.JsonSave(data_state),
                integrity=ocp.args.JsonSave(record),
            )
            if preprocessing is not None:
                items["preprocessing"] = ocp.args.JsonSave(preprocessing)
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._write_error(None, e) from e

    def _fingerprint_of(self, state: dict) -> dict[str, str]:
        if self._fingerprint is None:
            self._fingerprint = integrity.make_fingerprint()
        return self._fingerprint(state)

    def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        if step is None:  # an asynchronous save failed: the oldest started one not committed
            committed = set(self.all_steps())
            failed = [s for s in self._started if s not in committed]
            step = failed[0] if failed else None
        where = self.directory if step is None else self.directory / str(step)
        cause = integrity.storage_cause(error)
        return CheckpointWriteError(
            f"could not write the checkpoint {where}: {cause}. The earlier checkpoints in "
            f"{self.directory} are intact; free space or fix permissions, then rerun the same "
            f"command to resume"
        )

    def check_for_errors(self) -> None:
        """Raises CheckpointWriteError if a background save failed."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._write_error(None, e) from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[dict, dict]:
        """(state, data_state) of `step` (default: the newest), placed as `abstract_state` says.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set, so every array
        comes back directly onto the devices and with the sharding of the current mesh (which may
        differ from the one it was saved from).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        restored = self._restore_items(abstract_state, step)
        return restored.state, restored.data_state

    def _restore_items(self, abstract_state: Any, step: int, *json_items: str):
        """The state (placed as `abstract_state` says), data_state and `json_items` of `step`."""
        items = {name: ocp.args.JsonRestore() for name in ("data_state", *json_items)}
        return self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), **items),
        )

    def _restore_verified(self, abstract_state: Any, step: int) -> tuple[dict, dict]:
        item_dir = self.directory / str(step) / "integrity"
        if not item_dir.exists():
            if (self.directory / str(step) / "state").exists():
                # Written before fingerprints existed: restored as it is.
                return self.restore(abstract_state, step)
            raise DamagedCheckpointError(f"step {step} has no state/ or integrity/ item")
        restored = self._restore_items(abstract_state, step, "integrity")
        record = restored.integrity
        if record.get("data_state") != restored.data_state:
            raise DamagedCheckpointError("data_state differs from the one recorded at save time")
        integrity.verify(self._fingerprint_of(restored.state), record.get("arrays", {}))
        self._restored_numerics = record.get("numerics")
        return restored.state, restored.data_state

    def restore_newest_intact(self, abstract_state: Any, warn=print) -> tuple[dict, dict] | None:
        """(state, data_state) of the newest step that restores and verifies; None if no steps.

        A damaged step (unreadable, truncated, or not matching its fingerprint) is reported with
        one `warn` line and moved to `<workdir>/checkpoints-damaged/`, so that later saves and
        `keep_checkpoints` never count it. Raises DamagedCheckpointError when every step is damaged.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            self._restored_numerics = None
            try:
                restored, error = self._restore_verified(abstract_state, step), None
            except Exception as e:  # noqa: BLE001  (any failure to read a step means: damaged)
                restored, error = None, e
            # Several processes each read their own shards: one bad read makes the step damaged
            # for all, so that they resume from the same step.
            damaged_on = distributed.processes_where(error is not None)
            if not damaged_on:
                self._warn_on_numerics_change(step, warn)
                return restored
            reason = integrity.short_reason(error) if error else f"read by process(es) {damaged_on}"
            moved = self._move_aside(step)
            warn(
                f"WARNING checkpoint step {step} in {self.directory} is damaged "
                f"({reason}); moved to {moved}, trying the previous one"
            )
        if steps:
            raise DamagedCheckpointError(
                f"every checkpoint in {self.directory} is damaged (steps {steps}, now in "
                f"{self.directory.parent / DAMAGED_DIR}); rerun with --restart to start over"
            )
        return None

    def _warn_on_numerics_change(self, step: int, warn) -> None:
        """One `warn` line when the step was written on another numerics fingerprint (versions,
        devices, CPU features): the run continues, but not bit for bit as it would have there."""
        if self._numerics is None:
            self._numerics = integrity.numerics_fingerprint()
        differ = integrity.numerics_differences(self._restored_numerics, self._numerics)
        if differ:
            warn(
                f"WARNING checkpoint step {step} in {self.directory} was written with another "
                f"numerics fingerprint (saved → here: {'; '.join(differ)}): the run continues, but its numbers "
                f"may differ in the last digits from a run done entirely on one of them"
            )

    def _move_aside(self, step: int) -> str:
        """Moves the step into checkpoints-damaged/ (process 0 alone; the others wait for it)."""

        def move() -> epath.Path:
            target_root = self.directory.parent / DAMAGED_DIR
            target_root.mkdir(parents=True, exist_ok=True)
            target = target_root / str(step)
            if target.exists():
                target = target_root / f"{step}.{len(list(target_root.iterdir()))}"
            (self.directory / str(step)).rename(target)
            return target

        moved = distributed.on_process_0(f"moving checkpoint step {step} aside", move)
        self._manager.reload()
        return moved

    def wait(self) -> None:
        """Blocks until every started save is committed; raises CheckpointWriteError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(None, e) from e

    def close(self) -> None:
        self._manager.close()


def _remove_interrupted_saves(directory: epath.Path) -> None:
    """Deletes Orbax's temporary step directories (`<step>.orbax-checkpoint-tmp-*`): what a kill
    during a save leaves. They are never restored; removing them frees their space."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for path in directory.iterdir():
        if ".orbax-checkpoint-tmp" in path.name:
            path.rmtree() if path.is_dir() else path.unlink()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what `TrainCheckpoints.restore` needs."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def absolute_path(path: str | epath.Path) -> epath.Path:
    """Orbax (tensorstore) refuses relative local paths; remote ones (gs://...) are left alone."""
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))
