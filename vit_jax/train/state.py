"""The train state {'params', 'opt_state', 'step'} (+ 'ema_params' with `config.ema_decay` > 0):
its model, its placement, and where it starts.

A run starts (`initial_state`) from exactly one of, in this order:
  1. the newest checkpoint in the workdir (a restart resumes: see `trainer.py`);
  2. `config.init_from`: a checkpoint of this project or a published `.npz` (fine-tuning), fitted
     to the new model by `vit_jax.model.transfer.adapt_params` (position embeddings resized, head
     re-initialized when the class count differs, anything else that differs is an error);
  3. a fresh random init.
Every path builds the arrays directly with their final sharding, so no device ever holds more than
its share of an FSDP-sharded model. The EMA of the params starts as a copy of the step-0 params (on
paths 2 and 3; path 1 restores it) and is sharded exactly as they are (`sharding.tree_specs` gives
'ema_params/<name>' the spec of 'params/<name>').
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from vit_jax import checkpoints, progress, trained
from vit_jax import sharding as sharding_lib
from vit_jax.model import transfer, vit
from vit_jax.model.config import ViTConfig


def _fresh_state(
    model: vit.VisionTransformer, tx: optax.GradientTransformation, rng, ema: bool = False
) -> dict:
    params = vit.init_params(model, rng)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state


def state_shapes(
    model: vit.VisionTransformer, tx: optax.GradientTransformation, ema: bool = False
) -> dict:
    """The train state as ShapeDtypeStructs, computed without allocating anything; `ema`: with
    'ema_params' (`config.ema_decay` > 0)."""
    return jax.eval_shape(lambda: _fresh_state(model, tx, jax.random.key(0), ema))


def init_state(
    model: vit.VisionTransformer,
    tx: optax.GradientTransformation,
    shardings: dict,
    rng: jax.Array,
    params: Any = None,
) -> dict:
    """A step-0 train state laid out as `shardings`: random params, or the given (host) params.

    With 'ema_params' in `shardings` the state holds them too: a copy of the step-0 params.
    """
    ema = "ema_params" in shardings
    if params is None:
        return jax.jit(lambda: _fresh_state(model, tx, rng, ema), out_shardings=shardings)()

    host_params = params
    params = jax.tree.map(_place_host_array, host_params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    state = {"params": params, "opt_state": opt_state, "step": step}
    if ema:  # buffers of their own: the train step donates both
        state["ema_params"] = jax.tree.map(_place_host_array, host_params, shardings["ema_params"])
    return state


def _place_host_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    # Every process holds the whole (host) array; each device takes only its own slice of it, which
    # works for multi-host meshes where `device_put` of a whole array would not.
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


class InitCheckpointError(ValueError):
    """`config.init_from` cannot be fitted to the model; the message names the parameter."""


def load_init_params(init_from: str, model_config: ViTConfig) -> dict:
    """Host params for `model_config` from a checkpoint of this project or a published file.

    Raises FileNotFoundError for a missing path and InitCheckpointError (naming the parameter and
    both shapes) when the checkpoint's architecture cannot be fitted to the model.
    """
    # Remote paths (gs://, https://) are checked by the reader: probing them here could hang offline.
    if "://" not in init_from and not epath.Path(init_from).exists():
        raise FileNotFoundError(f"config.init_from={init_from!r} does not exist")
    from vit_jax.interop import load  # interop (safetensors & co): imported only when it is used

    # The one reader: it tells our Orbax checkpoints from published files and reads either as it is
    # (a run that kept an EMA of its weights: the EMA ones, load_pretrained's default).
    loaded = load.load_checkpoint(init_from)
    try:
        return transfer.adapt_params(loaded.params, loaded.config, model_config)
    except ValueError as e:
        raise InitCheckpointError(f"config.init_from={init_from!r}: {e}") from None


def check_ema_matches(ckpt, shapes, ema_decay) -> None:
    """One clear error when the newest checkpoint's state has 'ema_params' and the run's has not,
    or the other way round (`config.ema_decay` turned on or off on resume; the workdir check
    refuses that already when config.json is there): restoring would fail on every step and move
    them all aside as damaged."""
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            saved = trained.has_ema_weights(ckpt.directory / str(step))
        except Exception:  # noqa: BLE001  (unreadable: the restore below reports the damage)
            continue
        if saved != ("ema_params" in shapes):
            have = "has EMA weights" if saved else "has no EMA weights (ema_decay was 0)"
            raise ValueError(
                f"config.ema_decay={ema_decay!r} does not fit the run in "
                f"{ckpt.directory}: its checkpoint of step {step} {have}, so it resumes only with "
                f"ema_decay {'> 0 (its own value)' if saved else '= 0'}; to change it, start "
                f"over with --restart, or fine-tune from it in a new workdir with "
                f"--config.init_from={ckpt.directory.parent}"
            )
        return


def initial_state(config, ckpt, model, tx, shapes, shardings) -> tuple[dict, int]:
    """(state, step): the newest checkpoint's if there is one, else step 0 from init_from/random."""
    check_ema_matches(ckpt, shapes, config.get("ema_decay", 0.0))
    restored = ckpt.restore_newest_intact(
        checkpoints.abstract_with_shardings(shapes, shardings), warn=progress.log
    )
    if restored is None:
        params = None
        if config.init_from:
            params = load_init_params(config.init_from, model.config)
            progress.log(f"Initialized from {config.init_from}")
        rng = jax.random.key(config.seed)
        return init_state(model, tx, shardings, rng, params), 0
    state, data_state = restored
    step = int(data_state["step"])
    warn_on_topology_change(data_state)
    if int(jax.device_get(state["step"])) != step:
        raise ValueError(
            f"checkpoint {step} in {ckpt.directory} is inconsistent: its train state is at step "
            f"{int(jax.device_get(state['step']))}"
        )
    progress.log(f"Resuming from the checkpoint of step {step} in {ckpt.directory}")
    return state, step


def log_sharding(shapes, shardings, mesh) -> None:
    """What FSDP did, in one line; `mesh.fsdp > 1` that shards nothing is worth a warning."""
    specs = jax.tree.map(lambda s: s.spec, shardings)
    line, any_sharded = sharding_lib.describe(shapes, specs, dict(mesh.shape))
    progress.log(line)
    if mesh.shape["fsdp"] > 1 and not any_sharded:
        message = (
            f"mesh.fsdp={mesh.shape['fsdp']} but no parameter is sharded: every one is smaller "
            f"than config.fsdp_min_size or matched a 'replicate' rule, so the 'fsdp' devices "
            f"only split the batch. Lower config.fsdp_min_size to shard this model."
        )
        logging.warning(message)
        progress.log(f"WARNING {message}")


def warn_on_topology_change(data_state: dict) -> None:
    """A checkpoint from another process count continues exactly only with random-access data."""
    saved = data_state.get("process_count")
    if saved is None or saved == jax.process_count():
        return
    if data_state.get("order") == "global":
        progress.log(
            f"Resuming a {saved}-process checkpoint on {jax.process_count()} process(es): the "
            f"data order is global, so training continues exactly as it would have"
        )
    else:
        logging.warning(
            "Resuming a %s-process checkpoint on %d process(es) with per-process data order "
            "(the train split is streamed, not read at random): the examples seen from here on "
            "differ from an uninterrupted run (some repeated, some skipped in this epoch).",
            saved,
            jax.process_count(),
        )
