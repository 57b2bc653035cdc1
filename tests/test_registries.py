"""Every entry of every choice table is wired end to end (ARCHITECTURE.md: "Where does a new X go").

A name added to a table must do what it says on a tiny input, checked against what it means, not
only its shapes: poolings and position embeddings (model_config.POOLINGS, POSEMBS) build, train one
step and export or are refused by name; remat policies (REMAT_POLICIES) give the plain gradients;
schedules (optim.SCHEDULES) warm up to the peak; losses (train_step.LOSSES) match their definition
and are what the train step reports and lowers; eval metrics (evaluation.METRICS) match a numpy
reference over the real examples only. The data side (augmentations, RandAugment ops, datasets)
is in test_data_registries.py, optimizers in test_optim.py (every optimizer a recipe names builds
and trains), checkpoint formats in test_formats.py (every format round-trips).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY, random_params

import vit_jax
from vit_jax import sharding
from vit_jax.interop import formats, save
from vit_jax.model import config as model_config
from vit_jax.train import evaluation, optim, plan
from vit_jax.train import state as train_state
from vit_jax.train import step as train_step

IMAGES = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
TARGETS = jax.nn.one_hot(jnp.arange(4) % 10, 10)


def _one_sgd_step_lowers_the_loss(model):
    params = random_params(model)
    loss = lambda p: train_step.cross_entropy(model.apply({"params": p}, IMAGES), TARGETS).mean()
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)  # one SGD step
    after = jax.jit(loss)(optax.apply_updates(params, updates))
    assert float(after) < float(before)
    return params


def _exports_or_says_why_not(model, params, tmp_path, name):
    """Each format round-trips the logits, or refuses naming the option."""
    logits = jax.jit(model.apply)({"params": params}, IMAGES)
    for fmt in sorted(formats.REGISTRY):
        path = os.path.join(tmp_path, {"npz": "m.npz", "timm": "m.safetensors"}.get(fmt, fmt))
        try:
            vit_jax.save_pretrained(params, path, format=fmt, model=model)
        except ValueError as e:  # a refusal names what the format cannot hold (not always `name`)
            assert f"format {fmt!r} cannot represent" in str(e), e
            continue
        needed = save.reload_overrides(params, model.config, fmt)
        reloaded, reloaded_params = vit_jax.load_pretrained(path, **needed)
        np.testing.assert_allclose(
            jax.jit(reloaded.apply)({"params": reloaded_params}, IMAGES), logits, atol=1e-5
        )


@pytest.mark.parametrize("pool", model_config.POOLINGS)
def test_every_pooling_builds_trains_and_exports(pool, tmp_path):
    model = vit_jax.create_model(None, **TINY, num_classes=10, pool=pool)
    if pool == "none":  # every token's logits: not a classifier, so training refuses it by name
        from configs import common

        config = common.get_config()
        config.model = common.model_fields(None, pool=pool)
        with pytest.raises(ValueError, match="pool='none'"):
            plan.vit_config_for(config, num_classes=10, num_channels=3)
        params = random_params(model)
    else:
        params = _one_sgd_step_lowers_the_loss(model)
    _exports_or_says_why_not(model, params, tmp_path, f"pool={pool!r}")


@pytest.mark.parametrize("posemb", model_config.POSEMBS)
def test_every_position_embedding_builds_trains_and_exports(posemb, tmp_path):
    model = vit_jax.create_model(
        None, **TINY, num_classes=10, pool="gap", posemb=posemb, posemb_covers_prefix=False
    )
    params = _one_sgd_step_lowers_the_loss(model)
    _exports_or_says_why_not(model, params, tmp_path, "posemb")


@pytest.mark.parametrize("policy", list(model_config.REMAT_POLICIES))
def test_every_remat_policy_gives_the_plain_gradients(policy):
    plain = vit_jax.create_model(None, **TINY, num_classes=10)
    remat = vit_jax.create_model(None, **TINY, num_classes=10, remat_policy=policy)
    params = random_params(plain)

    def grads(model):
        loss = lambda p: train_step.cross_entropy(model.apply({"params": p}, IMAGES), TARGETS)
        return jax.jit(jax.grad(lambda p: loss(p).mean()))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads(remat), grads(plain)
    )


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_every_schedule_warms_up_to_the_peak_and_never_exceeds_it(name):
    schedule = optim.make_schedule({"name": name, "warmup_fraction": 0.1}, 2.0, 100)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0 and values[10] == pytest.approx(2.0)
    assert np.all(values <= 2.0 + 1e-6) and np.all(np.diff(values[:11]) > 0)


# --- Eval metrics: evaluation.METRICS ------------------------------------------------------------

# Written from each metric's definition, independently of its code; a new metric needs one here.
REFERENCE_METRICS = {
    "top1": lambda logits, labels: np.argsort(-logits, axis=-1)[:, 0] == labels,
    "top5": lambda logits, labels: (np.argsort(-logits, axis=-1)[:, :5] == labels[:, None]).any(-1),
}


class _LogitsAreThePixels:
    """Stands in for the model: the logits are the image's first pixel, so a test sets them."""

    def apply(self, variables, images, train):
        return images[:, 0, 0, :]


def _eval_batch(num_classes, real, padded, seed=0):
    """`real` examples with random logits, then `padded` ones as the input pipeline pads them
    (zero label, mask 0) whose logits make them correct if the mask were ignored."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(real + padded, num_classes)).astype(np.float32)
    logits[real:, 0] = 10.0  # the zero label's argmax is class 0: right, were it counted
    labels = rng.integers(0, num_classes, real + padded)
    labels[real:] = 0
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    one_hot[real:] = 0.0
    mask = np.array([1.0] * real + [0.0] * padded, np.float32)
    return {"image": logits[:, None, None, :], "label": one_hot, "mask": mask}, logits, labels


def test_every_metric_has_a_reference():
    assert set(REFERENCE_METRICS) == set(evaluation.METRICS)


@pytest.mark.parametrize("name", list(evaluation.METRICS))
def test_every_eval_metric_counts_real_examples_once_and_is_reported(name):
    metric, reference = evaluation.METRICS[name], REFERENCE_METRICS[name]
    num_classes, real, padded = 7, 13, 3
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    step = train_step.make_eval_step(
        _LogitsAreThePixels(), mesh, sharding.replicated(mesh), metrics=[name]
    )
    batches = [_eval_batch(num_classes, real, padded, seed) for seed in (0, 1)]
    for batch, logits, labels in batches:
        sums = jax.device_get(step({}, batch))
        assert set(sums) == {"loss", name, "count"} and sums["count"] == real
        per_example = reference(logits, labels)
        assert sums[name] == per_example[:real].sum() != per_example.sum()  # padding: not counted

    class Data:
        def __init__(self, classes):
            self.num_classes, self.num_eval_batches = classes, len(batches)

        def eval_iter(self):
            return (batch for batch, _, _ in batches)

    results = evaluation.evaluate(step, {}, Data(num_classes), mesh)
    expected = sum(reference(lg, lb)[:real].sum() for _, lg, lb in batches) / (2 * real)
    assert results[name] == pytest.approx(expected) and results["count"] == 2 * real
    assert f"| {name} {100 * expected:.2f}%" in evaluation.format_eval(5, results)
    if metric.min_classes > 1:  # e.g. top5 of 4 classes is always 1: not reported
        assert name not in evaluation.evaluate(step, {}, Data(metric.min_classes - 1), mesh)


def test_an_unknown_eval_metric_is_refused_by_name():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    with pytest.raises(ValueError, match=r"unknown eval metric\(s\) \['top3'\]; allowed: \['top1"):
        train_step.make_eval_step(_LogitsAreThePixels(), mesh, None, metrics=["top1", "top3"])


# --- Losses: train_step.LOSSES ------------------------------------------------------------------

# Per-example losses written from their definitions (log-sum-exp; log(1 + e^-x) per class).
REFERENCE_LOSSES = {
    "softmax_xent": lambda z, t: -(t * (z - np.log(np.exp(z).sum(-1, keepdims=True)))).sum(-1),
    "sigmoid_xent": lambda z, t: (t * np.log1p(np.exp(-z)) + (1 - t) * np.log1p(np.exp(z))).sum(-1),
}


def test_every_loss_has_a_reference():
    assert set(REFERENCE_LOSSES) == set(train_step.LOSSES)


@pytest.mark.parametrize("name", list(train_step.LOSSES))
def test_every_loss_matches_its_definition_and_trains(name):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 10)).astype(np.float32)
    soft = rng.dirichlet(np.ones(10), size=6).astype(np.float32)  # smoothed / mixed-up targets
    np.testing.assert_allclose(
        train_step.get_loss(name)(jnp.asarray(logits), jnp.asarray(soft)),
        REFERENCE_LOSSES[name](logits.astype(np.float64), soft),
        rtol=1e-5,
    )
    # Through the real jitted train step: one SGD step on a fixed batch lowers this loss.
    model = vit_jax.create_model(None, **TINY, num_classes=10)
    tx = optax.sgd(0.1)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    shardings = sharding.tree_shardings(train_state.state_shapes(model, tx), mesh, 2**30)
    state = train_state.init_state(model, tx, shardings, jax.random.key(0))
    step = train_step.make_train_step(model, tx, mesh, shardings, loss=name)
    batch = {"image": np.asarray(IMAGES), "label": np.asarray(TARGETS)}
    start_logits = np.asarray(model.apply({"params": state["params"]}, IMAGES), np.float64)
    state, first = step(
        state, batch
    )  # the step reports the named loss of the params it starts from
    expected = REFERENCE_LOSSES[name](start_logits, np.asarray(TARGETS)).mean()
    np.testing.assert_allclose(float(first["loss"]), expected, rtol=1e-5)
    _, second = step(state, batch)
    assert float(second["loss"]) < float(first["loss"])
    with pytest.raises(ValueError, match=r"config.loss='xent' is not supported; allowed: \["):
        train_step.get_loss("xent")
