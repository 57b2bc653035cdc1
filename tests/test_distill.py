"""Knowledge distillation (`config.distill`, vit_jax/train/distill.py): the losses on hand examples,
the distilled step against that formula, a frozen teacher (no gradient, not in the optimizer state
or the checkpoint), a trainer run that logs the teacher's cost and resumes exactly, and bad values.

The teacher is the tiny recipe at image size 24 (the student's is 16), trained once in-process
on host batches (test_trainer.FakeData): the step resizes the student's batch for it.
"""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_params_identical, run_with_devices, sigterm_at
from test_trainer import FakeData, tiny_config

from vit_jax import trained
from vit_jax.interop import input_convention
from vit_jax.model import transfer
from vit_jax.train import checks, dispatch, distill, plan, trainer, workdir
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step

TEACHER_SIZE = 24


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference(heads, targets, teacher, kind, t, w):
    """The distilled loss per example, in float64 numpy, as the module docstring writes it."""
    heads = [np.asarray(h, np.float64) for h in heads]
    teacher = np.asarray(teacher, np.float64)

    def ce(logits, y):
        return -(y * _log_softmax(logits)).sum(-1)

    def kl(student):
        p_log = _log_softmax(teacher / t)
        return t**2 * (np.exp(p_log) * (p_log - _log_softmax(student / t))).sum(-1)

    if kind == "function_matching":
        return sum(kl(h) for h in heads) / len(heads)
    if kind == "soft":
        term = kl(heads[-1])
    else:
        term = ce(heads[-1], np.eye(teacher.shape[-1])[teacher.argmax(-1)])
    return (1 - w) * ce(heads[0], targets) + w * term


# --- The losses on a hand example --------------------------------------------------------------

HAND_TEACHER = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], np.float32)
HAND_HEAD = np.array([[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]], np.float32)
HAND_DIST = np.array([[3.0, -1.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
HAND_TARGETS = np.array([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]], np.float32)


@pytest.mark.parametrize("kind", distill.KINDS)
@pytest.mark.parametrize("token", [False, True], ids=["logits", "distillation_token"])
def test_the_losses_equal_their_formulas_on_a_hand_example(kind, token):
    heads = (HAND_HEAD, HAND_DIST) if token else (HAND_HEAD,)
    got = distill.per_example_loss(
        tuple(jnp.asarray(h) for h in heads),
        jnp.asarray(HAND_TARGETS),
        jnp.asarray(HAND_TEACHER),
        kind=kind,
        temperature=2.0,
        weight=0.3,
        label_loss=train_step.cross_entropy,
    )
    expected = _reference(heads, HAND_TARGETS, HAND_TEACHER, kind, 2.0, 0.3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    # The terms as numbers: example 0, soft, no token, w = 0.3, T = 2.
    if kind == "soft" and not token:
        p = np.exp(_log_softmax(HAND_TEACHER[0] / 2))
        q = np.exp(_log_softmax(HAND_HEAD[0] / 2))
        by_hand = (
            0.7 * -(HAND_TARGETS[0] * _log_softmax(HAND_HEAD[0])).sum()
            + 0.3 * 4 * (p * np.log(p / q)).sum()
        )
        np.testing.assert_allclose(float(got[0]), by_hand, rtol=1e-5)


def test_kl_is_zero_for_the_teachers_own_logits_and_gradient_free_for_the_teacher():
    assert np.allclose(distill.kl_divergence(HAND_TEACHER, HAND_TEACHER, 3.0), 0.0, atol=1e-6)

    def loss(teacher):
        return distill.per_example_loss(
            (jnp.asarray(HAND_HEAD),),
            jnp.asarray(HAND_TARGETS),
            teacher,
            kind="soft",
            temperature=1.0,
            weight=1.0,
            label_loss=train_step.cross_entropy,
        ).sum()

    assert not np.any(np.asarray(jax.grad(loss)(jnp.asarray(HAND_TEACHER))))


def test_teacher_inputs_convert_the_convention_and_keep_identical_inputs_bit_for_bit():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    ours = input_convention.DEFAULT
    same = distill.teacher_inputs(jnp.asarray(images), ours, ours, (8, 8), 3)
    np.testing.assert_array_equal(np.asarray(same), images)
    imagenet = input_convention.IMAGENET
    got = distill.teacher_inputs(jnp.asarray(images), ours, imagenet, (8, 8), 3)
    pixels = images * 0.5 + 0.5
    expected = (pixels - np.asarray(imagenet.mean)) / np.asarray(imagenet.std)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    resized = distill.teacher_inputs(jnp.asarray(images), ours, ours, (16, 16), 3)
    assert resized.shape == (2, 16, 16, 3)


# --- A teacher workdir and the distilled step --------------------------------------------------


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A tiny teacher trained once, at another image size than the students'."""
    config = tiny_config(image_size=TEACHER_SIZE)
    work = str(tmp_path_factory.mktemp("teacher") / "w")
    trainer.train_and_evaluate(config, work, data=FakeData(config))
    return work


def distill_config(teacher, **overrides):
    fields = {"distill.teacher": teacher, "distill.temperature": 2.0, "distill.weight": 0.3}
    return tiny_config(**{**fields, **overrides})


def _first_step(config, steps=1):
    """The trainer's compiled program for `config`'s run, `steps` steps one per call: (run, initial
    student params, teacher params before, state after, losses)."""
    data = FakeData(config)
    run = plan.plan_run(config, data)
    pre = input_convention.for_training(config.dataset, 3)
    fn = train_step.make_multi_step(
        run.model,
        run.tx,
        run.mesh,
        run.shardings,
        seed=config.seed,
        loss=config.loss,
        teacher=run.teacher,
        student_preprocessing=pre,
    )
    state = train_state.init_state(run.model, run.tx, run.shardings, jax.random.key(config.seed))
    params0 = jax.device_get(state["params"])
    teacher0 = jax.device_get(run.teacher.params)
    batches = dispatch.to_devices(dispatch.grouped(data.train_iter(), [1] * steps, 1), run.mesh)
    losses, first_batch = [], None
    for size, batch in batches:
        if first_batch is None:
            first_batch = jax.device_get(batch)
        state, metrics = fn(state, batch, size)
        losses.append(float(np.asarray(metrics["loss"])[0]))
    return run, params0, teacher0, state, losses, first_batch


@pytest.mark.parametrize(
    "kind,token",
    [("soft", False), ("hard", False), ("function_matching", False), ("soft", True)],
)
def test_a_distilled_steps_loss_is_the_formula(teacher_workdir, kind, token):
    config = distill_config(teacher_workdir, **{"distill.kind": kind})
    config.model.distillation_token = token
    run, params0, _, _, losses, batch = _first_step(config)
    images, targets = batch["image"][0], batch["label"][0]
    assert run.teacher.image_size == (TEACHER_SIZE, TEACHER_SIZE)
    # The reference: both models' eval-mode logits (the tiny recipe has no dropout), the teacher
    # on the batch taken back to [0, 1] pixels, resized to 24 and renormalized to [-1, 1].
    student = run.model.apply({"params": params0}, images, return_intermediates=True)
    heads = student[1]["head_logits"] if token else (student[0],)
    pixels = jax.image.resize(
        images * 0.5 + 0.5, (len(images), TEACHER_SIZE, TEACHER_SIZE, 3), "bilinear"
    )
    teacher_images = (np.clip(np.asarray(pixels), 0, 1) - 0.5) / 0.5
    teacher_logits = run.teacher.model.apply(
        {"params": jax.device_get(run.teacher.params)}, teacher_images
    )
    expected = _reference(heads, targets, teacher_logits, kind, 2.0, 0.3).mean()
    np.testing.assert_allclose(losses[0], expected, rtol=2e-5)


@pytest.fixture(scope="module")
def stepped(teacher_workdir):
    return _first_step(distill_config(teacher_workdir), steps=3)


def test_the_teacher_gets_no_gradient_and_is_not_in_the_optimizer_state(stepped):
    run, params0, teacher0, state, losses, _ = stepped
    # Unchanged after 3 steps, and still readable (never donated).
    assert_params_identical(jax.device_get(run.teacher.params), teacher0)
    assert (
        max(np.abs(a - b).max() for a, b in zip(*map(jax.tree.leaves, (state["params"], params0))))
        > 0
    )  # the student did move
    assert sorted(state) == ["opt_state", "params", "step"]
    # The optimizer state is that of the student's params alone: same tree as a run without
    # a teacher, and its per-parameter moments have exactly the student's parameter count.
    assert jax.tree.structure(state["opt_state"]) == jax.tree.structure(run.shapes["opt_state"])
    student_count = sum(x.size for x in jax.tree.leaves(params0))
    teacher_count = sum(x.size for x in jax.tree.leaves(teacher0))
    assert teacher_count != student_count
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) % student_count == 0
    assert all(np.isfinite(losses))


def _checkpoint_arrays(work):
    """The array names the newest checkpoint's integrity record lists."""
    step = workdir.latest_checkpoint_step(work)
    folder = os.path.join(work, "checkpoints", str(step), "integrity")
    with open(os.path.join(folder, os.listdir(folder)[0])) as f:
        return json.load(f)["arrays"]


@pytest.fixture(scope="module")
def distilled_run(teacher_workdir, tmp_path_factory):
    config = distill_config(teacher_workdir, checkpoint_every_steps=4)
    work = str(tmp_path_factory.mktemp("student") / "w")
    result = trainer.train_and_evaluate(config, work, data=FakeData(config))
    return config, work, result


def test_a_trainer_run_logs_the_teachers_cost_and_checkpoints_no_teacher(
    teacher_workdir, tmp_path, capsys
):
    config = distill_config(teacher_workdir, total_steps=2)
    work = str(tmp_path / "w")
    result = trainer.train_and_evaluate(config, work, data=FakeData(config))
    assert result["step"] == 2
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("Distillation (soft"))
    assert f"from {teacher_workdir}: teacher " in line and "24x24" in line
    assert "GFLOPs per step" in line and "student's" in line
    arrays = _checkpoint_arrays(work)
    assert arrays and all(k.startswith(("['params']", "['opt_state']", "['step']")) for k in arrays)


def test_a_preempted_distilled_run_resumes_bit_identically(distilled_run, tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers can only be installed from the main thread")
    config, ref, ref_result = distilled_run

    work = str(tmp_path / "resumed")
    first = trainer.train_and_evaluate(config, work, data=FakeData(config, on_batch=sigterm_at(6)))
    assert first["preempted"] and 4 < first["step"] < 12
    other = distill_config(config.distill.teacher, checkpoint_every_steps=5, log_every_steps=3)
    other.steps_per_dispatch = 8
    second = trainer.train_and_evaluate(other, work, data=FakeData(other))
    assert not second["preempted"] and second["step"] == 12
    assert_params_identical(trained.read_model(work)[1], trained.read_model(ref)[1])
    assert second["eval"] == ref_result["eval"]
    steps = sorted(second["train_losses"])
    assert [second["train_losses"][s] for s in steps] == [
        ref_result["train_losses"][s] for s in steps
    ]


def test_distillation_fields_are_part_of_the_runs_identity(distilled_run):
    config, work, _ = distilled_run
    changed = distill_config(config.distill.teacher, **{"distill.weight": 0.6})
    with pytest.raises(ValueError, match="distill.weight"):
        trainer.train_and_evaluate(changed, work, data=FakeData(changed))


# --- Bad values: one clear error before any compute --------------------------------------------


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("kind", "medium", "distill.kind='medium'.*allowed: soft, hard, function_matching"),
        ("temperature", 0.0, r"distill.temperature=0.0 .*> 0"),
        ("temperature", -1.0, r"distill.temperature=-1.0 .*> 0"),
        ("weight", 1.5, r"distill.weight=1.5 .*\[0, 1\]"),
        ("weight", -0.1, r"distill.weight=-0.1 .*\[0, 1\]"),
    ],
)
def test_bad_distill_fields_are_one_clear_error(teacher_workdir, field, value, match):
    config = distill_config(teacher_workdir, **{f"distill.{field}": value})
    with pytest.raises(ValueError, match=match):
        checks.validate_training(config)


def test_an_unreadable_teacher_path_is_one_clear_error(tmp_path):
    config = distill_config(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"distill.teacher='.*missing' does not exist"):
        plan.plan_run(config, FakeData(config))
    garbage = tmp_path / "teacher.npz"
    garbage.write_bytes(b"not a checkpoint")
    config = distill_config(str(garbage))
    with pytest.raises(ValueError, match=r"distill.teacher='.*teacher.npz' cannot be read"):
        plan.plan_run(config, FakeData(config))


def test_pretrained_without_a_teacher_is_one_clear_error():
    config = tiny_config(**{"distill.pretrained": "augreg-i21k-ft-i1k"})
    with pytest.raises(ValueError, match="distill.pretrained='augreg-i21k-ft-i1k' needs"):
        checks.validate_training(config)


def test_a_teacher_of_another_class_count_is_one_clear_error(teacher_workdir, tmp_path):
    config = distill_config(teacher_workdir)
    data = FakeData(config, num_classes=7)
    with pytest.raises(ValueError, match="has 10 classes but the data has 7"):
        trainer.train_and_evaluate(config, str(tmp_path / "w"), data=data)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # refused before any state


def test_a_bf16_teacher_is_cast_and_sharded_like_the_student(teacher_workdir):
    config = distill_config(teacher_workdir, **{"distill.bf16": True})
    run = plan.plan_run(config, FakeData(config))
    leaves = jax.tree.leaves(run.teacher.params)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert run.teacher.model.config.dtype == "bfloat16"
    flat = transfer.flatten(run.teacher.params)
    assert all(flat[k].sharding == s for k, s in transfer.flatten(run.teacher.shardings).items())


@pytest.mark.slow  # a fresh Python on 4 simulated devices
def test_the_teacher_is_fsdp_sharded_like_the_student_on_a_mesh(teacher_workdir):
    """On a data 2 x fsdp 2 mesh the teacher's params take the student's specs (the same rules),
    its large arrays are split over 'fsdp', and distilled steps run."""
    out = run_with_devices(
        f"""
        import sys
        sys.path.insert(0, "tests")
        import json
        import jax
        import numpy as np
        from test_distill import _first_step, distill_config
        from vit_jax.model import transfer

        config = distill_config({teacher_workdir!r}, fsdp_min_size=0)
        config.mesh = {{"data": 2, "fsdp": 2}}
        run, params0, teacher0, state, losses, _ = _first_step(config, steps=2)
        teacher = transfer.flatten(run.teacher.params)
        student = transfer.flatten(state["params"])
        same = [k for k in teacher if k in student and teacher[k].shape == student[k].shape]
        print(json.dumps(dict(
            same=len(same),
            specs_equal=all(teacher[k].sharding.spec == student[k].sharding.spec for k in same),
            split=sum("fsdp" in str(x.sharding.spec) for x in teacher.values()),
            shard_smaller=any(
                x.addressable_shards[0].data.size < x.size for x in teacher.values()
            ),
            losses=losses,
            devices=jax.device_count(),
        )))
        """,
        devices=4,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["devices"] == 4 and result["same"] > 0 and result["specs_equal"]
    assert result["split"] > 0 and result["shard_smaller"]
    assert all(np.isfinite(result["losses"]))


def test_a_workdir_from_before_distillation_resumes_and_turning_it_on_is_refused():
    """config.json of a run written before `distill` existed lacks the fields: they read as off
    (workdir.ADDED_LATER), so it resumes; turning a teacher on for it is a difference."""
    new = json.loads(tiny_config().to_json_best_effort())
    old = {k: v for k, v in new.items() if k != "distill"}
    assert workdir.config_differences(old, new) == []
    on = json.loads(tiny_config(**{"distill.teacher": "/some/teacher"}).to_json_best_effort())
    assert workdir.config_differences(old, on) == ["distill.teacher '' → '/some/teacher'"]
