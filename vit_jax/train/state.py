"""The train state {'params', 'opt_state', 'step'}: its model, its placement, and where it starts.

A run starts (`initial_state`) from exactly one of, in this order:
  1. the newest checkpoint in the workdir (a restart resumes: see `trainer.py`);
  2. `config.init_from`: a checkpoint of this project or a published `.npz` (fine-tuning), fitted
     to the new model by `vit_jax.model.transfer.adapt_params` (position embeddings resized, head
     re-initialized when the class count differs, anything else that differs is an error);
  3. a fresh random init.
Every path builds the arrays directly with their final sharding, so no device ever holds more than
its share of an FSDP-sharded model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from vit_jax import checkpoints, progress
from vit_jax import sharding as sharding_lib
from vit_jax.model import transfer, vit
from vit_jax.model.config import ViTConfig


def _fresh_state(model: vit.VisionTransformer, tx: optax.GradientTransformation, rng) -> dict:
    params = vit.init_params(model, rng)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def state_shapes(model: vit.VisionTransformer, tx: optax.GradientTransformation) -> dict:
    """The train state as ShapeDtypeStructs, computed without allocating anything."""
    return jax.eval_shape(lambda: _fresh_state(model, tx, jax.random.key(0)))


def init_state(
    model: vit.VisionTransformer,
    tx: optax.GradientTransformation,
    shardings: dict,
    rng: jax.Array,
    params: Any = None,
) -> dict:
    """A step-0 train state laid out as `shardings`: random params, or the given (host) params."""
    if params is None:
        return jax.jit(lambda: _fresh_state(model, tx, rng), out_shardings=shardings)()

    params = jax.tree.map(_place_host_array, params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


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

    # The one reader: it tells our Orbax checkpoints from published files and reads either as it is.
    loaded = load.load_checkpoint(init_from)
    try:
        return transfer.adapt_params(loaded.params, loaded.config, model_config)
    except ValueError as e:
        raise InitCheckpointError(f"config.init_from={init_from!r}: {e}") from None


def initial_state(config, ckpt, model, tx, shapes, shardings) -> tuple[dict, int]:
    """(state, step): the newest checkpoint's if there is one, else step 0 from init_from/random."""
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
