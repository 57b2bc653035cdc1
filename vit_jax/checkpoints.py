"""Orbax checkpoints of a training run: save, resume, and read a trained model back.

Layout: `<workdir>/checkpoints/<step>/` holds these items:
  state         {'params', 'opt_state', 'step'}: the arrays, sharded as they were (OCDBT/Zarr);
  model_config  JSON of `ViTConfig.to_dict()`, so a checkpoint says what model it belongs to;
  preprocessing JSON of `vit_jax.preprocessing.Preprocessing.to_dict()`: the input convention;
  data_state    JSON, e.g. {"step": 1200, "order": "global", "process_count": 2, ...}: where the
                input pipeline resumes, and the topology that wrote it.
Every process calls save/restore (Orbax coordinates the hosts; each writes its own shards).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax.model_config import ViTConfig

ITEMS = ("state", "model_config", "preprocessing", "data_state")


class TrainCheckpoints:
    """An `ocp.CheckpointManager` of train states, keeping the newest `keep` steps.

    Saving is asynchronous when `async_save`: `save` returns once the arrays are copied off the
    devices (so the next, donating train step may overwrite them) and the files are written in the
    background; `wait()` blocks until they are committed.
    """

    def __init__(self, directory: str | epath.Path, *, keep: int = 3, async_save: bool = True):
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
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
        items = dict(
            state=ocp.args.StandardSave(state),
            model_config=ocp.args.JsonSave(model_config.to_dict()),
            data_state=ocp.args.JsonSave(data_state),
        )
        if preprocessing is not None:
            items["preprocessing"] = ocp.args.JsonSave(preprocessing)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[dict, dict]:
        """(state, data_state) of `step` (default: the newest), placed as `abstract_state` says.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set, so every array
        comes back directly onto the devices and with the sharding of the current mesh (which may
        differ from the one it was saved from).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data_state=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data_state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what `TrainCheckpoints.restore` needs."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


# ---------------------------------------------------------------------------------------------
# Reading a trained model back (fine-tuning, prediction): params only, as numpy, on the host.


def _is_step_dir(path: epath.Path) -> bool:
    return (path / "state").is_dir() and (path / "model_config").is_dir()


def find_step_dir(path: str | epath.Path) -> epath.Path:
    """A step dir, a checkpoints dir (its newest step) or a workdir (its newest step) → step dir."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if _is_step_dir(path):
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    steps = (
        [p for p in path.iterdir() if p.name.isdigit() and _is_step_dir(p)] if path.is_dir() else []
    )
    if not steps:
        raise FileNotFoundError(
            f"{str(path)!r} holds no checkpoint: expected <workdir>, <workdir>/checkpoints or "
            f"<workdir>/checkpoints/<step> written by vit_jax training"
        )
    return max(steps, key=lambda p: int(p.name))


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


def read_preprocessing(path: str | epath.Path) -> dict[str, Any] | None:
    """The input convention a checkpoint recorded (None for checkpoints written before it was)."""
    step_dir = find_step_dir(absolute_path(path))
    if not (step_dir / "preprocessing").is_dir():
        return None
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        step_dir / "preprocessing", args=ocp.args.JsonRestore()
    )


def read_model(path: str | epath.Path) -> tuple[ViTConfig, dict]:
    """(ViTConfig, params as numpy) of a checkpoint; `path` as `find_step_dir` accepts.

    Reads only the parameters (not the optimizer state), onto the host, so it works on any number
    of devices and does not need the mesh the checkpoint was written from.
    """
    step_dir = find_step_dir(absolute_path(path))
    config_dict = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        step_dir / "model_config", args=ocp.args.JsonRestore()
    )
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    params_meta = tree["params"]
    item = {"params": jax.tree.map(lambda m: np.zeros((), m.dtype), params_meta)}
    restore_args = {
        "params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)
    }
    restored = checkpointer.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    return ViTConfig.from_dict(config_dict), restored["params"]
