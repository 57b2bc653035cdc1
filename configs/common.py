"""The shared base config: every field the data pipeline and the trainer read, with its meaning.

Recipes (`digits.py`, `pretrain.py`, `finetune.py`) start from `get_config()` and change what they
need. Every field exists here, so `--config.<key>=value` works for all of them and a misspelt key is
an error. Each field's meaning is the comment beside its default below; the data fields' (dataset,
data_dir, splits, image_size, batch sizes, seed, pp.*) are beside theirs in `vit_jax/data/defaults.py`.

Two pairs say the same thing two ways, and a run sets exactly one of each (0 or None = unset):
total_steps / total_epochs and schedule.warmup_steps / schedule.warmup_fraction. On the command line
the one given wins over the recipe's: --config.total_steps=100 on a recipe with total_epochs trains
100 steps (`vit_jax/tools/train.py`, ALTERNATIVES).
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from vit_jax.data.defaults import DATA_DEFAULTS, PREPROCESSING_DEFAULTS
from vit_jax.model import config as vit_config

# Model fields the trainer fills in from the data, so a recipe cannot get them inconsistent.
DATA_DERIVED_MODEL_FIELDS = ("image_size", "num_classes", "num_channels")

# Biases, LayerNorm scales, position embeddings, class/register tokens, MAP probe, LayerScale.
NO_DECAY = r"(^|/)(bias|scale|pos_embedding|cls|registers|probe|layerscale_attn|layerscale_mlp)$"


def model_fields(variant: str | None = None, **overrides) -> ml_collections.ConfigDict:
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
            value_type = {
                "bool": bool,
                "int": int,
                "float": float,
                "str": str,
                "tuple[int, ...]": tuple,
            }[str(types[name]).split("|")[0].strip()]
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
    config.pp.scale_range = config_dict.placeholder(tuple)  # None by default, settable from flags

    # Model: every `vit_jax.ViTConfig` field except image_size, num_classes and num_channels (those
    # come from the data). `model.dtype` is the activation dtype (mixed precision: 'bfloat16'
    # activations, float32 master params via `model.param_dtype`).
    config.model = model_fields("ViT-B/16")
    # '' = from scratch; else anything `vit_jax.load_pretrained` reads (a workdir or its
    # checkpoints[/<step>], a published .npz, timm, HF; gs:// and https:// online). Position
    # embeddings are resized to the new grid and the head re-initialized when the class count
    # differs; any other mismatch is an error naming the key.
    config.init_from = ""
    # 'softmax_xent', or 'sigmoid_xent': independent binary cross-entropies summed over classes
    # (big_vision's ImageNet-21k loss, paired with model.head_bias_init=-10).
    config.loss = "softmax_xent"

    # Length: exactly one of the two (see the module docstring).
    config.total_steps = config_dict.placeholder(int)  # optimizer steps to train
    config.total_epochs = config_dict.placeholder(float)  # passes over train_split, rounded up
    # Gradient accumulation: each step averages the gradients of accum_steps micro-batches of
    # batch_size / accum_steps (one big batch's update, up to rounding, in a micro-batch's memory;
    # dropout/drop-path masks are drawn per micro-batch, so equal in distribution with those on).
    config.accum_steps = 1

    # Optimizer, all through optax.
    config.optim = ml_collections.ConfigDict(
        dict(
            # Any optax optimizer by its function name ('adamw', 'sgd', 'lion', 'adafactor', ...):
            # optax.<name>(learning_rate, **kwargs).
            name="adamw",
            learning_rate=1e-3,  # peak learning rate (after warmup), for the global batch
            # That function's own arguments, e.g. {'b1': 0.9, 'mu_dtype': 'bfloat16'} for 'adamw',
            # {'momentum': 0.9, 'nesterov': True} for 'sgd'; {} = optax's defaults. A whole new
            # dict from the command line: --config.optim.kwargs="{'momentum': 0.9}".
            kwargs=ml_collections.ConfigDict(),
            # Multiplied by the schedule: decoupled (Loshchilov & Hutter) when the optimizer takes
            # `weight_decay` ('adamw', 'lion', ...), else added to the gradient (L2: 'sgd', 'adam').
            weight_decay=0.0,
            # Regex over parameter paths ('Transformer/encoderblock_0/LayerNorm_0/scale'): no
            # weight decay for matches. Default: biases, norm scales, posembs, cls/register/probe.
            no_decay=NO_DECAY,
            grad_clip_norm=1.0,  # clip the gradient's global norm to this; 0 = no clipping
            lr_mults=(),  # ((regex, multiplier), ...): the first match scales a param's lr
            freeze="",  # regex: matching params get zero updates and no optimizer state
        )
    )
    # Learning-rate schedule, after a linear warmup from 0.
    config.schedule = ml_collections.ConfigDict(
        dict(
            name="cosine",  # 'cosine' | 'linear' | 'rsqrt' | 'constant'
            warmup_steps=0,  # linear warmup steps from 0 to optim.learning_rate
            warmup_fraction=0.0,  # the warmup as a fraction of total steps (set one of the two)
            end_lr_fraction=0.0,  # cosine/linear: the decay ends at learning_rate * this
            rsqrt_timescale=10_000,  # rsqrt: lr * sqrt(timescale / (step - warmup + timescale))
            cooldown_steps=0,  # rsqrt/constant: linear cooldown to 0 over the last N steps
        )
    )

    # Devices.
    # Sizes of the mesh's axes; -1 = all remaining devices. The batch is split over both; with
    # fsdp > 1 every parameter (and its optimizer state) of >= fsdp_min_size elements is cut over
    # 'fsdp' along its largest divisible dimension (ZeRO-3); smaller ones stay whole.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.fsdp_min_size = 2**14  # in elements
    # ((regex, spec), ...) over parameter paths, first match wins; spec 'fsdp' (the rule above),
    # 'replicate', or a PartitionSpec tuple such as (None, 'fsdp'). Optimizer state follows its
    # parameter; the start-up log says what was sharded (vit_jax/sharding.py).
    config.sharding_rules = ()
    config.prefetch_to_device = 2  # batches put on the devices ahead of the step; 0 = off
    # Train steps per call into the devices (up to K stacked batches, one compiled loop): cuts
    # per-step host overhead, which dominates for tiny models. Logs/evals/checkpoints keep their
    # steps, and the numbers are the same bit for bit for any K (vit_jax/train/step.py).
    config.steps_per_dispatch = 1
    # Draw and augment train batches on the devices from the whole train split held there (small
    # datasets without random crops / RandAugment; vit_jax/data/on_device.py).
    config.data_on_device = False
    # CPU only: devices XLA's CPU platform exposes (set before JAX starts). 0 = one per core,
    # lowered to the largest count that divides the micro-batch and eval batch, in multiples of
    # the mesh's fixed axes (digits: 478 -> 646 img/s on 2 cores). XLA_FLAGS'
    # --xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES win.
    config.cpu_devices = 0

    # Loop, evaluation, checkpoints, logs (all files go to the workdir).
    config.log_every_steps = 50  # progress line + TensorBoard/metrics.jsonl train metrics
    config.eval_every_steps = 0  # evaluate the whole eval_split every N steps; 0 = at the end
    # Save an Orbax checkpoint every N steps (0 = at the end only); rerunning the same command
    # resumes from the newest one.
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # keep the newest K checkpoints
    config.async_checkpoints = True  # write checkpoints in the background while training goes on

    # Exponential moving average of the weights, updated in the train step: 0 = off; else the
    # decay, warmed up as min(ema_decay, (1 + step) / (10 + step)) (vit_jax/train/step.py). The EMA
    # weights are sharded and checkpointed with the params and evaluated beside them (the
    # 'eval_ema' records of metrics.jsonl); load_pretrained/predict/convert read them by default.
    config.ema_decay = 0.0
    # Few-shot linear evaluation of the frozen pre-logits features during training (ridge
    # regression on k examples per class: vit_jax/train/fewshot.py), logged as split 'fewshot'.
    config.fewshot = ml_collections.ConfigDict(
        dict(
            every_steps=0,  # run every N steps and at the end; 0 = off
            datasets=(),  # TFDS names / image folders; () = the run's own dataset
            train_split="",  # where the shots are drawn from; '' = config.train_split
            test_split="",  # what the accuracy is measured on; '' = config.eval_split
            shots=(1, 5, 10, 25),  # examples per class; each <= the smallest class of train_split
            seeds=(0,),  # one draw of the shots per seed; the accuracy is their mean
        )
    )
    # Knowledge distillation from a frozen teacher run inside the train step
    # (vit_jax/train/distill.py): sharded like the student, not in the train state; the teacher
    # sees the student's batch, resized and normalized to its own image size and input convention.
    # The log states its cost per step. Part of what a run is: a resume may not change them.
    config.distill = ml_collections.ConfigDict(
        dict(
            # '' = off; else anything vit_jax.load_pretrained reads (a workdir, .npz, timm or HF
            # file; with `pretrained`, a model name such as 'ViT-B/16'). Its class count must be
            # the data's.
            teacher="",
            # a public checkpoint name of `teacher` (vit_jax.list_pretrained()); '' = none
            pretrained="",
            # 'soft': (1-w)·CE(labels) + w·T²·KL(teacher/T || student/T) (Hinton, DeiT);
            # 'hard': (1-w)·CE(labels) + w·CE(argmax teacher) (DeiT); 'function_matching':
            # T²·KL only, on the same augmented batch (Beyer et al. 2022). A student with a
            # distillation token gets the distillation term on head_dist, CE on head.
            kind="soft",
            temperature=1.0,  # T (> 0) of 'soft' and 'function_matching'
            weight=0.5,  # w in [0, 1] of 'soft' and 'hard'
            bf16=False,  # run the teacher (params and activations) in bfloat16 (half its memory)
        )
    )
    return config
