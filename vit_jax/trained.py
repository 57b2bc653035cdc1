"""A trained model read back from a training run's checkpoint: params only, as numpy, on the host.

`read_model(path)` is what fine-tuning (`config.init_from`), `vit_jax.load_pretrained` and the
command lines use; `path` is a workdir, its `checkpoints/` directory or one step directory
(`find_step_dir`). It reads the newest intact step (a damaged one is named in one warning line and
the previous one read, as a training restore does, but nothing is moved) and verifies its params
against the fingerprints recorded at save time. `weights` picks the EMA of the weights or the raw
ones (`chosen_weights` says which and why). Writing and resuming a run: `vit_jax.checkpoints`.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vit_jax import checkpoints, integrity
from vit_jax.model.config import ViTConfig

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
            if p.name.isdigit()
            and p.is_dir()
            and any((p / item).exists() for item in checkpoints.ITEMS)
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
        raise checkpoints.DamagedCheckpointError(f"no {' or '.join(missing)} item")
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
    steps, exact = _step_dirs(checkpoints.absolute_path(path))
    for step_dir in steps:
        try:
            return (*_read_step(step_dir, weights), step_dir)
        except NoEmaWeightsError:
            raise
        except Exception as e:  # noqa: BLE001  (any failure to read a step means: damaged)
            reason = integrity.short_reason(e)
            if exact:
                raise checkpoints.DamagedCheckpointError(
                    f"checkpoint {step_dir} is damaged ({reason}); pass its workdir to use the "
                    f"newest intact step"
                ) from None
            warn(
                f"checkpoint step {step_dir.name} in {step_dir.parent} is damaged ({reason}); "
                f"using the previous one"
            )
    raise checkpoints.DamagedCheckpointError(
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
