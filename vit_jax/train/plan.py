"""`plan_run(config)`: everything a run is, resolved once, before any state exists or any step runs.

The trainer, the dry run (`train.py --dry_run`) and the benchmark's bare loop of the train step all
start here, so they build the very same run. In order (each step can refuse the config with one
ValueError naming the field, before any compute):
  1. the training fields (`checks.validate_training`), the mesh and the batch sizes over it;
  2. the data: the one place a run opens its dataset (`vit_jax.data.get_datasets`);
  3. the run's length (`checks.total_steps_of`) and the model the data decides (`vit_config_for`);
  4. the optimizer and its schedule, the train state's shapes (`jax.eval_shape`, nothing
     allocated) and where each array of it lives (`sharding.tree_shardings`);
  5. with `config.distill.teacher`, the teacher (`distill.load_teacher`): read, its class count
     checked against the data's, placed on the mesh like the student. No part of the state.
The state itself is made later (`state.initial_state`), directly with those shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from vit_jax import sharding
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer, param_shapes
from vit_jax.train import checks, distill, optim
from vit_jax.train import state as train_state


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What `plan_run` resolved; `data` is the opened dataset (`vit_jax.data.Data` or the like)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    data: Any
    total_steps: int
    model: VisionTransformer
    tx: optax.GradientTransformation
    lr_schedule: Callable[[int], Any]
    shapes: dict  # the train state (+ 'ema_params' with EMA) as ShapeDtypeStructs
    shardings: dict  # a NamedSharding per array of the train state
    teacher: distill.Teacher | None = None  # config.distill's teacher, on the mesh (None: off)

    @property
    def vit_config(self) -> ViTConfig:
        return self.model.config


def vit_config_for(config: ml_collections.ConfigDict, num_classes: int, num_channels: int):
    """The ViTConfig a run trains: `config.model` plus what the data decides.

    image_size comes from `config.image_size` (what the pipeline resizes to); the class and channel
    counts come from the dataset, so a config cannot disagree with its data.
    """
    fields = config.model.to_dict()
    overlap = sorted(set(fields) & {"image_size", "num_classes", "num_channels"})
    if overlap:
        raise ValueError(
            f"config.model sets {overlap}; these come from the data: use config.image_size "
            f"(the class and channel counts are read from the dataset)"
        )
    if fields.get("pool") == "none":
        raise ValueError(
            "config.model.pool='none' returns every token's logits, which a classifier cannot be "
            "trained on; allowed for training: 'token', 'gap', 'map'"
        )
    return ViTConfig.from_dict(
        {
            **fields,
            "image_size": config.image_size,
            "num_classes": num_classes,
            "num_channels": num_channels,
        }
    )


def plan_run(
    config: ml_collections.ConfigDict,
    data: Any = None,
    *,
    prepare: bool = True,
    before_data: Callable[[jax.sharding.Mesh], None] | None = None,
) -> RunPlan:
    """The run `config` describes; see the module docstring for the order of its checks.

    `data`: an opened dataset to use instead of opening `config.dataset` (tests pass in-memory
    data; it needs `num_classes`, `num_train_examples`, `image_shape`, `train_iter`, `eval_iter`).
    `prepare=False` names a TFDS dataset that is not prepared yet instead of downloading it (the dry
    run). `before_data(mesh)` runs the caller's own cheap checks before the dataset is opened,
    which may download and prepare it (the trainer's workdir checks).
    """
    checks.validate_training(config)
    mesh = sharding.make_mesh(config.mesh)
    checks.check_batch_sizes(config, mesh)
    if before_data is not None:
        before_data(mesh)
    if data is None:
        from vit_jax import data as data_lib  # TensorFlow loads only when a run needs data

        data = data_lib.get_datasets(config, prepare=prepare)
    total_steps = checks.total_steps_of(config, data.num_train_examples)
    model = VisionTransformer(
        vit_config_for(config, data.num_classes, num_channels=data.image_shape[-1])
    )
    tx, lr_schedule = optim.make_optimizer(
        config.optim, config.schedule, param_shapes(model), total_steps
    )
    shapes = train_state.state_shapes(model, tx, ema=bool(config.get("ema_decay")))
    shardings = sharding.tree_shardings(
        shapes, mesh, config.fsdp_min_size, config.get("sharding_rules", ())
    )
    teacher = distill.load_teacher(config, mesh, data.num_classes)
    return RunPlan(
        config, mesh, data, total_steps, model, tx, lr_schedule, shapes, shardings, teacher
    )
