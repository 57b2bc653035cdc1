"""The shared base config: every field the data pipeline and the trainer read, with its meaning.

Recipes (`digits.py`, `pretrain.py`, `finetune.py`) start from `get_config()` and change what they
need. Every field exists here, so `--config.<key>=value` works for all of them and a misspelt key is
an error.

Data (read by `vit_jax.input_pipeline`): dataset, data_dir, train_split, eval_split, image_size,
  batch_size, eval_batch_size, seed, shuffle_buffer_size, skip_corrupt_images and pp.* (preprocessing
  and augmentation). Each one's default and meaning: `vit_jax/data/defaults.py`.

Model:
  model                 every `vit_jax.ViTConfig` field except image_size, num_classes and
                        num_channels (those come from the data). Build it with
                        `model_config('ViT-B/16', dropout_rate=0.1)`. `model.dtype` is the
                        activation dtype (mixed precision: 'bfloat16' activations, float32 master
                        params via `model.param_dtype`).
  init_from             '' = train from scratch; else a checkpoint to start from: this project's
                        `<workdir>/checkpoints[/<step>]` or a published vit_jax/big_vision `.npz`
                        (gs:// works online). Position embeddings are resized to the new grid and
                        the head re-initialized when the class count differs; any other mismatch is
                        an error naming the key.

Loss:
  loss                  'softmax_xent' (default) or 'sigmoid_xent' (independent binary
                        cross-entropies summed over classes: big_vision's ImageNet-21k loss, paired
                        with model.head_bias_init=-10).

Length:
  total_steps           optimizer steps to train. Exactly one of total_steps / total_epochs is set;
                        None or 0 = unset. On the command line the one given wins:
                        --config.total_steps=100 on a recipe with total_epochs trains 100 steps.
  total_epochs          passes over the train split (rounded up to whole steps).
  accum_steps           gradient accumulation: each step averages the gradients of `accum_steps`
                        micro-batches of batch_size / accum_steps (the same update as one big batch,
                        up to float rounding, with the memory of a micro-batch; dropout/drop-path
                        masks are drawn per micro-batch, so with those on it is equal in
                        distribution, not bit for bit).

Optimizer (`optim`) — all through optax:
  optim.name            any optax optimizer, by its function name: 'adamw', 'sgd', 'adam', 'lion',
                        'adafactor', ... (`optax.<name>(learning_rate, **kwargs)`).
  optim.kwargs          that function's own arguments, e.g. {'b1': 0.9, 'mu_dtype': 'bfloat16'} for
                        'adamw', {'momentum': 0.9, 'nesterov': True} for 'sgd'; {} = optax's
                        defaults. A whole new dict from the command line:
                        --config.optim.kwargs="{'momentum': 0.9}".
  optim.learning_rate   peak learning rate (after warmup), for the global batch.
  optim.weight_decay    weight decay, multiplied by the learning-rate schedule: decoupled
                        (Loshchilov & Hutter) when the optimizer takes `weight_decay` ('adamw',
                        'lion', ...), else added to the gradient (L2: 'sgd', 'adam').
  optim.no_decay        regex over parameter paths ('Transformer/encoderblock_0/LayerNorm_0/scale');
                        matching params get no weight decay. Default: biases, norm scales, position
                        embeddings and the class/register/probe tokens.
  optim.grad_clip_norm  clip the gradient's global norm to this; 0 = no clipping.
  optim.lr_mults        ((regex, multiplier), ...): a param's lr is scaled by the first matching
                        multiplier (1 when none match).
  optim.freeze          regex: matching params are not updated (zero updates, no optimizer state);
                        '' = train everything.

Learning-rate schedule (`schedule`):
  schedule.name         'cosine' | 'linear' | 'rsqrt' | 'constant', after a linear warmup from 0.
  schedule.warmup_steps linear warmup steps from 0 to optim.learning_rate.
  schedule.warmup_fraction the warmup as a fraction of total steps instead (scales with the run);
                        set one of the two (0 = unset; the command line's wins, as for the length).
  schedule.end_lr_fraction cosine/linear decay ends at learning_rate * this at total_steps.
  schedule.rsqrt_timescale rsqrt: lr · sqrt(timescale / (step - warmup + timescale)).
  schedule.cooldown_steps rsqrt/constant: linear cooldown to 0 over the last N steps (0 = none).

Devices:
  mesh.data, mesh.fsdp  sizes of the device mesh's axes ('data', 'fsdp'); -1 = all remaining
                        devices. The batch is split over both axes; with mesh.fsdp > 1 each
                        parameter (and its optimizer state) of at least `fsdp_min_size` elements is
                        sharded over 'fsdp' along its largest divisible dimension (ZeRO-3 style);
                        smaller ones stay replicated.
  fsdp_min_size         see above, in elements.
  cpu_devices           CPU only: how many devices XLA's CPU platform exposes (train.py sets it
                        before JAX starts). 0 = one per core, lowered to the largest count that
                        divides the micro-batch and eval batch and is a multiple of the mesh's
                        fixed axes (a mesh without -1 gets its own count) (a small model's step
                        keeps both cores busy: digits 478 → 646 img/s on 2 cores);
                        XLA_FLAGS=--xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES win.
  sharding_rules        ((regex, spec), ...) over parameter paths, first match wins; spec 'fsdp'
                        (the default above), 'replicate', or a PartitionSpec tuple such as
                        (None, 'fsdp'). Optimizer state follows its parameter. The start-up log
                        says how many parameters / bytes ended up sharded (vit_jax/sharding_rules).
  prefetch_to_device    batches put on the devices ahead of the step (host→device overlap); 0 = off.
  data_on_device        draw and augment train batches on the devices from the whole train split
                        held there (small datasets without random crops / RandAugment; see
                        vit_jax/data/on_device.py): the host no longer sets the pace.
  steps_per_dispatch    train steps per call into the devices (a lax.scan over K stacked batches;
                        same results as K single calls): cuts per-step host overhead, which
                        dominates for tiny models. Logs/evals/checkpoints still happen at their steps.

Loop, evaluation, checkpoints, logs (all files go to the workdir):
  log_every_steps       progress line + TensorBoard/metrics.jsonl train metrics every N steps.
  eval_every_steps      evaluate on the whole eval_split every N steps (0 = only at the end).
  checkpoint_every_steps save an Orbax checkpoint every N steps (0 = only at the end); a restart of
                        the same command resumes from the newest one.
  keep_checkpoints      keep the newest K checkpoints.
  async_checkpoints     write checkpoints in the background while training continues.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from vit_jax import model_config as vit_config
from vit_jax.data.defaults import DATA_DEFAULTS, PREPROCESSING_DEFAULTS

# Model fields the trainer fills in from the data, so a recipe cannot get them inconsistent.
DATA_DERIVED_MODEL_FIELDS = ("image_size", "num_classes", "num_channels")

# Biases, LayerNorm scales, position embeddings, class/register tokens, MAP probe, LayerScale.
NO_DECAY = r"(^|/)(bias|scale|pos_embedding|cls|registers|probe|layerscale_attn|layerscale_mlp)$"


def model_config(variant: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """`ViTConfig` fields of `variant` (+ overrides), less the data-derived ones, as a ConfigDict.

    Listing every field (not just the overrides) makes each one settable from the command line and
    shows the whole architecture in the saved config.json. Fields whose value is None get a typed
    placeholder so that `--config.model.representation_size=768` still parses.
    """
    vit = vit_config.get_config(variant, **overrides)
    types = {f.name: f.type for f in dataclasses.fields(vit)}
    fields = {}
    for name, value in vit.to_dict().items():
        if name in DATA_DERIVED_MODEL_FIELDS:
            continue
        if value is None:
            # Annotations are strings ('float | None'); the first name is the value type.
            value_type = {"bool": bool, "int": int, "float": float, "str": str}[
                str(types[name]).split("|")[0].strip()
            ]
            fields[name] = config_dict.placeholder(value_type)
        else:
            fields[name] = tuple(value) if isinstance(value, list) else value
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data: the defaults of vit_jax/data/defaults.py (data_dir typed, so it can be set from flags).
    config.update(DATA_DEFAULTS)
    config.data_dir = config_dict.placeholder(str)
    config.pp = ml_collections.ConfigDict(dict(PREPROCESSING_DEFAULTS))

    # Model.
    config.model = model_config("ViT-B/16")
    config.init_from = ""
    config.loss = "softmax_xent"

    # Length.
    config.total_steps = config_dict.placeholder(int)
    config.total_epochs = config_dict.placeholder(float)
    config.accum_steps = 1

    # Optimizer and schedule.
    config.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-3,
            kwargs=ml_collections.ConfigDict(),
            weight_decay=0.0,
            no_decay=NO_DECAY,
            grad_clip_norm=1.0,
            lr_mults=(),
            freeze="",
        )
    )
    config.schedule = ml_collections.ConfigDict(
        dict(
            name="cosine",
            warmup_steps=0,
            warmup_fraction=0.0,
            end_lr_fraction=0.0,
            rsqrt_timescale=10_000,
            cooldown_steps=0,
        )
    )

    # Devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.fsdp_min_size = 2**14
    config.sharding_rules = ()
    config.prefetch_to_device = 2
    config.steps_per_dispatch = 1
    config.data_on_device = False
    config.cpu_devices = 0

    # Loop, evaluation, checkpoints, logs.
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True
    return config
