"""Knowledge distillation from a frozen teacher (`config.distill`): the losses and the teacher's input.

  soft               (1-w)·CE(student, targets) + w·T²·KL(softmax(teacher/T) || softmax(student/T))
                     (Hinton et al. 2015; DeiT's soft distillation)
  hard               (1-w)·CE(student, targets) + w·CE(student, one_hot(argmax teacher)) (DeiT)
  function_matching  T²·KL(softmax(teacher/T) || softmax(student/T)) only: the teacher sees exactly
                     the student's augmented, mixed-up batch (Beyer et al. 2022, big_vision)

With a distillation token (DeiT students) the label term goes on the class-token head and the
distillation term on `head_dist`; function matching (no label term) puts the KL on both heads.
The teacher's input is the student's batch converted inside the step (`teacher_inputs`): back to
[0, 1] pixels from the student's input convention, channels matched, resized to the teacher's
image size, normalized to the teacher's convention. Every kind feeds the teacher that same batch
(augmented, mixed up: what the step trains on), which is what function matching asks for.

The teacher (`load_teacher`) is read once when a run is planned, placed sharded like the student
(`sharding.tree_shardings`: FSDP splits a teacher too large for one device), optionally cast to
bfloat16, and handed to the compiled step as an argument of its own: not donated, not part of the
train state, so neither in the optimizer state nor in a checkpoint. It is a pure function of its
checkpoint, so a resumed run sees the very same teacher (as long as the teacher's files are not
changed in between).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding as sharding_lib
from vit_jax.interop.input_convention import Preprocessing
from vit_jax.model.vit import VisionTransformer, count_params

KINDS = ("soft", "hard", "function_matching")


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float):
    """Per-example T²·KL(softmax(teacher/T) || softmax(student/T)), in float32."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature**2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def per_example_loss(
    head_logits: Sequence[jax.Array],
    targets: jax.Array,
    teacher_logits: jax.Array,
    *,
    kind: str,
    temperature: float,
    weight: float,
    label_loss,
) -> jax.Array:
    """The distilled loss per example. `head_logits`: (logits,) or (class head, distillation head)."""
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    label_head, distill_head = head_logits[0], head_logits[-1]
    if kind == "function_matching":
        return sum(kl_divergence(teacher_logits, h, temperature) for h in head_logits) / len(
            head_logits
        )
    if kind == "soft":
        distilled = kl_divergence(teacher_logits, distill_head, temperature)
    elif kind == "hard":
        hard = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
        distilled = -jnp.sum(hard * jax.nn.log_softmax(distill_head.astype(jnp.float32)), -1)
    else:
        raise ValueError(f"config.distill.kind={kind!r}; allowed: {', '.join(KINDS)}")
    return (1.0 - weight) * label_loss(label_head, targets) + weight * distilled


def teacher_inputs(
    images: jax.Array,
    student: Preprocessing,
    teacher: Preprocessing,
    teacher_size: Sequence[int],
    teacher_channels: int,
) -> jax.Array:
    """The student's (B, H, W, C) inputs as the teacher's (B, *teacher_size, teacher_channels)."""
    channels = images.shape[-1]
    student_mean, student_std = student.mean_std(channels)
    teacher_mean, teacher_std = teacher.mean_std(channels)
    same_scale = np.array_equal(student_mean, teacher_mean) and np.array_equal(
        student_std, teacher_std
    )
    same = (
        same_scale
        and channels == teacher_channels
        and student.channel_order == teacher.channel_order
        and tuple(images.shape[1:3]) == tuple(teacher_size)
    )
    if same:
        return images  # nothing to convert: no float noise added
    x = images.astype(jnp.float32)
    pixels = x * student_std + student_mean
    if student.channel_order != teacher.channel_order and channels == 3:
        pixels = pixels[..., ::-1]
    if teacher_channels != channels:
        if teacher_channels == 3:
            pixels = jnp.repeat(pixels, 3, axis=-1)
        else:
            luma = jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
            pixels = (pixels @ luma)[..., None]
    shape = (pixels.shape[0], *teacher_size, teacher_channels)
    if tuple(pixels.shape) != shape:
        pixels = jax.image.resize(pixels, shape, method="bilinear", antialias=True)
    pixels = jnp.clip(pixels, 0.0, 1.0)
    mean, std = teacher.mean_std(teacher_channels)
    return (pixels - mean) / std


def enabled(config) -> bool:
    """Whether `config` distills (`config.distill.teacher` set)."""
    distill = config.get("distill")
    return bool(distill is not None and distill.get("teacher"))


def check_fields(distill) -> None:
    """The `config.distill` fields, before any data or teacher is read: one ValueError naming the
    field, its value and what is allowed."""
    if distill is None:
        return

    def require(ok, field, value, allowed):
        if not ok:
            raise ValueError(f"config.distill.{field}={value!r} is invalid: {allowed}")

    teacher, pretrained = distill.get("teacher") or "", distill.get("pretrained") or ""
    require(isinstance(teacher, str), "teacher", teacher, "must be a path or model name ('' = off)")
    require(
        isinstance(pretrained, str), "pretrained", pretrained, "must be a checkpoint name or ''"
    )
    if pretrained and not teacher:
        raise ValueError(
            f"config.distill.pretrained={pretrained!r} needs config.distill.teacher: the model it "
            f"is a checkpoint of (e.g. --config.distill.teacher=ViT-B/16); see "
            f"vit_jax.list_pretrained()"
        )
    if not teacher:
        return  # off: the other fields are not read
    if not pretrained and "://" not in teacher and not os.path.exists(os.path.expanduser(teacher)):
        raise ValueError(
            f"config.distill.teacher={teacher!r} does not exist: allowed are a training workdir "
            f"(or one of its checkpoints), an .npz, timm or HF checkpoint file or folder, or a "
            f"model name with config.distill.pretrained"
        )
    kind = distill.get("kind")
    require(kind in KINDS, "kind", kind, f"allowed: {', '.join(KINDS)}")

    def number(value):
        return (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        )

    temperature, weight = distill.get("temperature"), distill.get("weight")
    require(number(temperature) and temperature > 0, "temperature", temperature, "must be > 0")
    require(
        number(weight) and 0 <= weight <= 1,
        "weight",
        weight,
        "must be in [0, 1] (the share of the distillation term)",
    )
    bf16 = distill.get("bf16")
    require(isinstance(bf16, bool), "bf16", bf16, "must be True or False")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher, ready for the step: its model, its params on the mesh, its convention."""

    source: str
    model: VisionTransformer
    params: Any  # on the mesh, laid out as `shardings`
    shardings: Any
    preprocessing: Preprocessing
    kind: str
    temperature: float
    weight: float

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.config.image_size)

    def logits(self, params, images: jax.Array, student: Preprocessing) -> jax.Array:
        """The teacher's logits (B, K), float32, of the student's inputs `images`; no gradient."""
        params = jax.lax.stop_gradient(params)
        cfg = self.model.config
        x = teacher_inputs(images, student, self.preprocessing, cfg.image_size, cfg.num_channels)
        x = x.astype(jnp.dtype(cfg.dtype))
        return jax.lax.stop_gradient(
            self.model.apply({"params": params}, x, train=False).astype(jnp.float32)
        )


def load_teacher(config, mesh, num_classes: int) -> Teacher | None:
    """`config.distill.teacher` read (any format `load_pretrained` reads) and placed on `mesh`;
    None when the run does not distill. One ValueError before any compute for a teacher that
    cannot be read or whose class count is not the data's."""
    if not enabled(config):
        return None
    distill = config.distill
    check_fields(distill)
    from vit_jax.interop import load  # the formats' readers: imported only when a run distills

    source = distill.teacher
    try:
        loaded = load.load_checkpoint(source, pretrained=distill.get("pretrained") or None)
    except Exception as e:  # noqa: BLE001  (any reader's failure: one line naming the field)
        raise ValueError(
            f"config.distill.teacher={source!r} cannot be read as a checkpoint: "
            f"{type(e).__name__}: {e}"
        ) from None
    if loaded.config.num_classes != num_classes:
        raise ValueError(
            f"config.distill.teacher={source!r} has {loaded.config.num_classes} classes but the "
            f"data has {num_classes}: logit distillation needs a teacher of the same classes "
            f"(fine-tune it on this dataset first)"
        )
    model_config = loaded.config
    params = loaded.params
    if distill.get("bf16"):
        model_config = model_config.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    shardings = sharding_lib.tree_shardings(
        {"params": params}, mesh, config.fsdp_min_size, config.get("sharding_rules", ())
    )["params"]
    placed = jax.tree.map(_place, params, shardings)
    return Teacher(
        source=str(source),
        model=VisionTransformer(model_config),
        params=placed,
        shardings=shardings,
        preprocessing=loaded.preprocessing,
        kind=distill.kind,
        temperature=float(distill.temperature),
        weight=float(distill.weight),
    )


def _place(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _flops(fn, *args) -> float | None:
    try:
        cost = jax.jit(fn).lower(*args).cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis: the line says so)
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def cost_line(teacher: Teacher, student: VisionTransformer, batch_size: int) -> str:
    """One log line: the teacher's size and its forward FLOPs per step (XLA's cost analysis of
    one batch) against the student's forward + backward."""
    scfg = student.config
    images = jax.ShapeDtypeStruct((batch_size, *scfg.image_size, scfg.num_channels), jnp.float32)
    tcfg = teacher.model.config
    t_images = jax.ShapeDtypeStruct(
        (batch_size, *tcfg.image_size, tcfg.num_channels), jnp.dtype(tcfg.dtype)
    )
    t_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher.params)
    s_params = jax.eval_shape(
        lambda: student.init(jax.random.key(0), jnp.zeros((1, *images.shape[1:])))["params"]
    )
    t_flops = _flops(lambda p, x: teacher.model.apply({"params": p}, x), t_params, t_images)

    def student_loss(p, x):
        return student.apply({"params": p}, x).sum()

    s_flops = _flops(jax.grad(student_loss), s_params, images)
    size = f"{count_params(t_params):,} params, {tcfg.image_size[0]}x{tcfg.image_size[1]}"
    dtype = "bfloat16" if tcfg.dtype == "bfloat16" else "float32"
    head = (
        f"Distillation ({teacher.kind}, T={teacher.temperature:g}, weight {teacher.weight:g}) "
        f"from {teacher.source}: teacher {size}, {dtype}"
    )
    if t_flops is None or s_flops is None:
        return f"{head}; its FLOPs per step: unknown (no XLA cost analysis on this backend)"
    return (
        f"{head}; {t_flops / 1e9:.3f} GFLOPs per step (forward, {batch_size} examples) vs the "
        f"student's {s_flops / 1e9:.3f} (forward + backward): +{100 * t_flops / s_flops:.0f}% "
        f"per step"
    )
