"""Orbax checkpoints of a training run: save, resume, and read a trained model back.

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

import logging
import os
from typing import Any

import jax
import numpy as np
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


# ---------------------------------------------------------------------------------------------
# Reading a trained model back (fine-tuning, prediction): params only, as numpy, on the host.

# Which weights of a step are read: 'ema' (the exponential moving average, `ema_params`) or 'raw'
# (`params`); None: 'ema' when the step has them, else 'raw' (`chosen_weights` says why).
WEIGHTS = ("ema", "raw")
_STATE_KEY = {"ema": "ema_params", "raw": "params"}


class NoEmaWeightsError(ValueError):
    """weights='ema' was asked of a checkpoint whose run kept no EMA (`config.ema_decay` = 0)."""


def check_weights(weights: str | None) -> None:
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(
            f"weights={weights!r} is invalid; allowed: 'ema' (the EMA of the weights), 'raw' (the "
            f"trained weights themselves) or None (EMA when the checkpoint has it, else raw)"
        )


def _state_tree_metadata(step_dir: epath.Path) -> dict:
    return ocp.PyTreeCheckpointer().metadata(step_dir / "state").item_metadata.tree


def has_ema_weights(step_dir: str | epath.Path) -> bool:
    """Whether a step dir's state holds 'ema_params' (its run had `config.ema_decay` > 0)."""
    return "ema_params" in _state_tree_metadata(epath.Path(step_dir))


def chosen_weights(step_dir: str | epath.Path, weights: str | None = None) -> str:
    """'ema' or 'raw': what `weights` asks of the step, where None means its EMA weights when it
    has them (a run with an EMA is evaluated on both, and the EMA is the model recipes such as
    DeiT's report and ship), else its raw weights. NoEmaWeightsError (naming the step) for 'ema'
    from a step without them."""
    return _choose(_state_tree_metadata(epath.Path(step_dir)), step_dir, weights)


def _choose(tree: dict, step_dir, weights: str | None) -> str:
    check_weights(weights)
    has_ema = "ema_params" in tree
    if weights == "ema" and not has_ema:
        raise NoEmaWeightsError(
            f"weights='ema': checkpoint {step_dir} has no EMA weights (its run had "
            f"config.ema_decay=0); allowed here: weights='raw' (or None: the raw weights)"
        )
    return weights or ("ema" if has_ema else "raw")


def _is_step_dir(path: epath.Path) -> bool:
    return (path / "state").is_dir() and (path / "model_config").is_dir()


def _step_dirs(path: epath.Path) -> tuple[list[epath.Path], bool]:
    """The step dirs `path` names, newest first, and whether it named one step exactly.

    A workdir or checkpoints dir lists every numbered folder holding any checkpoint item (so a
    damaged step, e.g. one whose state/ is gone, is seen and reported rather than passed over).
    """
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if _is_step_dir(path):
        return [path], True
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = []
    if path.is_dir():
        steps = [
            p
            for p in path.iterdir()
            if p.name.isdigit() and p.is_dir() and any((p / item).exists() for item in ITEMS)
        ]
    if not any(_is_step_dir(p) for p in steps):
        raise FileNotFoundError(
            f"{str(path)!r} holds no checkpoint: expected <workdir>, <workdir>/checkpoints or "
            f"<workdir>/checkpoints/<step> written by vit_jax training"
        )
    return sorted(steps, key=lambda p: int(p.name), reverse=True), False


def find_step_dir(path: str | epath.Path) -> epath.Path:
    """A step dir, a checkpoints dir (its newest step) or a workdir (its newest step) → step dir.

    Only the layout is looked at; `read_trained` also checks the step reads back intact.
    """
    return next(p for p in _step_dirs(epath.Path(path))[0] if _is_step_dir(p))


def is_checkpoint(path: str | epath.Path) -> bool:
    """Whether `path` is (or contains) a checkpoint of this project."""
    try:
        find_step_dir(path)
    except FileNotFoundError:
        return False
    return True


def absolute_path(path: str | epath.Path) -> epath.Path:
    """Orbax (tensorstore) refuses relative local paths; remote ones (gs://...) are left alone."""
    if "://" in str(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def _read_json(directory: epath.Path) -> Any:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        directory, args=ocp.args.JsonRestore()
    )


def _read_step(
    step_dir: epath.Path, weights: str | None = None
) -> tuple[ViTConfig, dict, dict | None]:
    """(config, params as numpy, preprocessing dict or None) of one step, its params (the EMA ones
    or the raw ones: `chosen_weights`) verified against the fingerprints recorded at save time
    (steps written before them: as they are)."""
    if not _is_step_dir(step_dir):
        missing = [item for item in ("state", "model_config") if not (step_dir / item).is_dir()]
        raise DamagedCheckpointError(f"no {' or '.join(missing)} item")
    config = ViTConfig.from_dict(_read_json(step_dir / "model_config"))
    tree = _state_tree_metadata(step_dir)
    key = _STATE_KEY[_choose(tree, step_dir, weights)]
    checkpointer = ocp.PyTreeCheckpointer()
    params_meta = tree[key]
    item = {key: jax.tree.map(lambda m: np.zeros((), m.dtype), params_meta)}
    restore_args = {
        key: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
    }
    restored = checkpointer.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    params = restored[key]
    if (step_dir / "integrity").is_dir():
        recorded = _read_json(step_dir / "integrity").get("arrays", {})
        recorded = {k: v for k, v in recorded.items() if k.startswith(f"['{key}']")}
        integrity.verify(integrity.make_fingerprint()({key: params}), recorded)
    preprocessing = None
    if (step_dir / "preprocessing").is_dir():
        preprocessing = _read_json(step_dir / "preprocessing")
    return config, params, preprocessing


def _warn(message: str) -> None:
    logging.getLogger("vit_jax").warning(message)


def read_trained(
    path: str | epath.Path, warn=_warn, weights: str | None = None
) -> tuple[ViTConfig, dict, dict | None, epath.Path]:
    """(config, params, preprocessing dict or None, step dir) of the newest intact step.

    `path` as `find_step_dir` accepts. `weights`: 'ema', 'raw' or None (`chosen_weights`: the EMA
    weights when the step has them). For a workdir or checkpoints dir, a step that cannot be read
    or whose params do not match their fingerprint is named in one `warn` line and the previous one
    is used, as a training restore does (nothing is moved: reading changes no file). One step
    named exactly must be intact. Raises DamagedCheckpointError when no step is, and
    NoEmaWeightsError (not a damage: nothing older is tried) for weights='ema' from a step without.
    """
    check_weights(weights)
    steps, exact = _step_dirs(absolute_path(path))
    for step_dir in steps:
        try:
            return (*_read_step(step_dir, weights), step_dir)
        except NoEmaWeightsError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure to read a step means: damaged)
            reason = integrity.short_reason(e)
            if exact:
                raise DamagedCheckpointError(
                    f"checkpoint {step_dir} is damaged ({reason}); pass its workdir to use the "
                    f"newest intact step"
                ) from None
            warn(
                f"checkpoint step {step_dir.name} in {step_dir.parent} is damaged ({reason}); "
                f"using the previous one"
            )
    raise DamagedCheckpointError(
        f"every checkpoint in {steps[0].parent} is damaged (steps "
        f"{[int(p.name) for p in steps]}); the run has nothing intact to read"
    )


def read_model(path: str | epath.Path, weights: str | None = None) -> tuple[ViTConfig, dict]:
    """(ViTConfig, params as numpy) of a checkpoint's newest intact step (`read_trained`; `weights`
    as there: None reads the EMA weights when the run kept them).

    Reads only the parameters (not the optimizer state), onto the host, so it works on any number
    of devices and does not need the mesh the checkpoint was written from.
    """
    config, params, _, _ = read_trained(path, weights=weights)
    return config, params
