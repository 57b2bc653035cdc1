"""The optimizer and learning-rate schedule, built from `config.optim` and `config.schedule` with optax.

`config.optim.name` is the name of any optax optimizer (`optax.<name>(learning_rate, ...)`: 'adamw',
'sgd', 'lion', 'adafactor', ...) and `config.optim.kwargs` its own arguments (`b1`, `momentum`,
`mu_dtype`, ...), so a new optimizer is a config change. Around it, the same for every optimizer:
  1. clip the gradient's global norm (over the trainable parameters);
  2. weight decay on the parameters not matching `optim.no_decay`: passed to the optimizer when it
     takes `weight_decay` (decoupled, as in 'adamw'), else added to the gradient (L2, e.g. 'sgd');
  3. the optimizer itself, with the learning-rate schedule;
  4. per-parameter learning-rate multipliers (`optim.lr_mults`, first matching regex wins).
Frozen parameters (`optim.freeze`) get zero updates and keep no optimizer state.

Regexes match parameter paths written with '/', e.g. 'Transformer/encoderblock_3/MlpBlock_3/Dense_0/bias'.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The fields of `config.optim` read here; the optimizer's own settings go in `kwargs`.
OPTIM_FIELDS = (
    "name",
    "learning_rate",
    "kwargs",
    "weight_decay",
    "no_decay",
    "grad_clip_norm",
    "lr_mults",
    "freeze",
)
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def param_path(key_path: tuple) -> str:
    """A jax tree key path → 'Transformer/encoder_norm/scale'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def tree_map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(param_path(kp), leaf), tree)


def _compile(pattern: str, field: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field}={pattern!r} is not a valid regex: {e}") from None


# ---------------------------------------------------------------------------------------------
# Schedule.


def warmup_steps_of(schedule: Mapping[str, Any], total_steps: int) -> int:
    """`schedule.warmup_steps`, or `schedule.warmup_fraction` of `total_steps` (rounded); 0 = unset.

    A fraction scales with the run, so a recipe's warmup still fits a short `--config.total_steps`.
    """
    steps = int(schedule.get("warmup_steps") or 0)
    fraction = float(schedule.get("warmup_fraction") or 0.0)
    if steps and fraction:
        raise ValueError(
            f"set one of config.schedule.warmup_steps ({steps}) and "
            f"config.schedule.warmup_fraction ({fraction}); 0 unsets one"
        )
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"config.schedule.warmup_fraction={fraction} must be in [0, 1]")
    return steps or round(fraction * total_steps)


def make_schedule(schedule: Mapping[str, Any], learning_rate: float, total_steps: int):
    """step → learning rate: linear warmup from 0, then `schedule.name` until `total_steps`.

    cosine:   lr · (f + (1 - f) · ½(1 + cos(π t))), t the fraction of post-warmup steps done, f =
              end_lr_fraction;
    linear:   lr · (1 - (1 - f) t);
    rsqrt:    lr · sqrt(timescale / (step - warmup + timescale)), the "inverse square root" decay
              that needs no known length (big_vision), optionally cooled down linearly to 0;
    constant: lr, optionally cooled down linearly to 0 over the last `cooldown_steps`.
    """
    name = schedule["name"]
    if name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={name!r} is not supported; allowed: {SCHEDULES}")
    warmup = warmup_steps_of(schedule, total_steps)
    end_fraction = float(schedule.get("end_lr_fraction", 0.0))
    timescale = float(schedule.get("rsqrt_timescale", 10_000))
    cooldown = int(schedule.get("cooldown_steps", 0))
    if not 0 <= warmup <= total_steps:
        raise ValueError(
            f"config.schedule.warmup_steps={warmup} must be in [0, total_steps={total_steps}]"
        )
    if not 0 <= cooldown <= total_steps:
        raise ValueError(
            f"config.schedule.cooldown_steps={cooldown} must be in [0, total_steps={total_steps}]"
        )
    decay_steps = max(total_steps - warmup, 1)

    def schedule_fn(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            factor = end_fraction + (1.0 - end_fraction) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        elif name == "linear":
            factor = 1.0 - (1.0 - end_fraction) * t
        elif name == "rsqrt":
            factor = jnp.sqrt(timescale / (jnp.maximum(step - warmup, 0.0) + timescale))
        else:
            factor = jnp.ones_like(step)
        if cooldown and name in ("rsqrt", "constant"):
            factor *= jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
        if warmup:
            factor *= jnp.minimum(step / warmup, 1.0)
        return learning_rate * factor

    return schedule_fn


# ---------------------------------------------------------------------------------------------
# Per-parameter masks and multipliers.


def _decays(no_decay: str) -> Callable[[str], bool]:
    pattern = _compile(no_decay, "config.optim.no_decay") if no_decay else None
    return lambda path: not (pattern and pattern.search(path))


def _multiplier(lr_mults: Any) -> Callable[[str], float]:
    rules = [(_compile(p, "config.optim.lr_mults"), float(m)) for p, m in lr_mults or ()]
    return lambda path: next((m for pattern, m in rules if pattern.search(path)), 1.0)


def decay_mask(params: Any, no_decay: str) -> Any:
    """True where weight decay applies: every parameter whose path does not match `no_decay`."""
    decays = _decays(no_decay)
    return tree_map_with_path(lambda path, _: decays(path), params)


def lr_multipliers(params: Any, lr_mults: Any) -> Any:
    """A float per parameter: the multiplier of the first (regex, multiplier) pair that matches."""
    multiplier = _multiplier(lr_mults)
    return tree_map_with_path(lambda path, _: multiplier(path), params)


def freeze_labels(params: Any, freeze: str) -> Any:
    """'frozen' or 'trained' per parameter, for `optax.multi_transform`."""
    pattern = _compile(freeze, "config.optim.freeze") if freeze else None
    return tree_map_with_path(
        lambda path, _: "frozen" if pattern and pattern.search(path) else "trained", params
    )


# These two look at parameter paths when they run, not at a mask tree fixed in advance, because
# under `optax.multi_transform` (freezing) they see trees with the frozen leaves taken out.


def add_decayed_weights(weight_decay: float, no_decay: str) -> optax.GradientTransformation:
    """updates + weight_decay * params, for the parameters whose path does not match `no_decay`."""
    decays = _decays(no_decay)

    def update_fn(updates, state, params):
        def add(path, u, p):
            return u + weight_decay * p.astype(u.dtype) if decays(param_path(path)) else u

        return jax.tree_util.tree_map_with_path(add, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def scale_by_lr_mults(lr_mults: Any) -> optax.GradientTransformation:
    """Multiply each parameter's update by the multiplier of the first regex matching its path."""
    multiplier = _multiplier(lr_mults)

    def update_fn(updates, state, params=None):
        del params
        return tree_map_with_path(lambda path, u: u * multiplier(path), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# ---------------------------------------------------------------------------------------------
# The optimizer.


def optax_optimizer(name: str) -> Callable[..., optax.GradientTransformation]:
    """`optax.<name>`, checked to be an optimizer: a function taking `learning_rate`."""
    factory = getattr(optax, name, None) if isinstance(name, str) else None
    if not callable(factory) or "learning_rate" not in _arguments(factory):
        raise ValueError(
            f"config.optim.name={name!r} is not an optax optimizer; allowed: the name of any "
            f"optax function taking learning_rate, e.g. 'adamw', 'sgd', 'lion', 'adafactor'"
        )
    return factory


def _arguments(factory: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(factory).parameters)


def _optimizer_kwargs(optim: Mapping[str, Any], factory: Callable) -> dict[str, Any]:
    kwargs = optim.get("kwargs") or {}
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs)
    allowed = [a for a in _arguments(factory) if a not in ("learning_rate", "weight_decay", "mask")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"config.optim.kwargs {unknown} are not arguments of optax.{optim['name']}; allowed: "
            f"{allowed} (weight decay and its mask come from config.optim.weight_decay/no_decay)"
        )
    return kwargs


def make_optimizer(
    optim: Mapping[str, Any], schedule: Mapping[str, Any], params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, lr schedule) for `params` (arrays or ShapeDtypeStructs).

    `params` is only read for its tree structure and paths (which parameters are frozen).
    """
    stray = sorted(set(optim) - set(OPTIM_FIELDS))
    if stray:
        raise ValueError(
            f"config.optim has {stray}; allowed: {list(OPTIM_FIELDS)}. An optimizer's own "
            f"settings go in config.optim.kwargs, e.g. kwargs={{'b1': 0.9}}"
        )
    factory = optax_optimizer(optim["name"])
    kwargs = _optimizer_kwargs(optim, factory)
    lr_schedule = make_schedule(schedule, float(optim["learning_rate"]), total_steps)
    weight_decay = float(optim.get("weight_decay") or 0.0)
    no_decay = optim.get("no_decay", "")

    chain = []
    if optim.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(float(optim["grad_clip_norm"])))
    if "weight_decay" in _arguments(factory):
        # Decoupled (AdamW-style): the optimizer scales it by the schedule itself.
        kwargs["weight_decay"] = weight_decay
        if no_decay:
            if "mask" not in _arguments(factory):
                raise ValueError(
                    f"optax.{optim['name']} takes no weight-decay mask: set "
                    f"config.optim.no_decay='' (decay everything) or weight_decay=0"
                )
            kwargs["mask"] = lambda tree: decay_mask(tree, no_decay)
    elif weight_decay:
        chain.append(add_decayed_weights(weight_decay, no_decay))  # L2, before the optimizer
    chain.append(factory(learning_rate=lr_schedule, **kwargs))
    if optim.get("lr_mults"):
        chain.append(scale_by_lr_mults(optim["lr_mults"]))
    tx = optax.chain(*chain)

    if optim.get("freeze"):
        labels = freeze_labels(params, optim["freeze"])
        if "trained" not in jax.tree.leaves(labels):
            raise ValueError(f"config.optim.freeze={optim['freeze']!r} freezes every parameter")
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, lr_schedule
