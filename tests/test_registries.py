"""Every entry of every choice table is wired end to end (ARCHITECTURE.md: "Where does a new X go").

A name added to a table must do what it says on a tiny input, checked against what it means, not
only its shapes: poolings and position embeddings (model_config.POOLINGS, POSEMBS) build, train one
step and export or are refused by name; remat policies (REMAT_POLICIES) give the plain gradients;
schedules (optim.SCHEDULES) warm up to the peak; losses (train_step.LOSSES) match their definition
and are what the train step reports and lowers; eval metrics (evaluation.METRICS) match a numpy
reference over the real examples only; every preprocessing field (data/defaults.py
PREPROCESSING_DEFAULTS) has the effect it names; every RandAugment op (randaugment.OPS) is reachable
and changes an image; every TFDS builder we ship trains and evaluates through the pipeline.
Optimizers have theirs in test_optim.py (every optimizer a recipe names builds and trains),
checkpoint formats in test_formats.py (every format round-trips).
"""

import inspect
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import TINY, random_params

import vit_jax
from vit_jax import convert, evaluation, model_config, optim, sharding, train_state, train_step
from vit_jax.data import preprocess, randaugment
from vit_jax.data.defaults import PREPROCESSING_DEFAULTS

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
    for fmt in sorted(convert.FORMATS):
        path = os.path.join(tmp_path, {"npz": "m.npz", "timm": "m.safetensors"}.get(fmt, fmt))
        try:
            vit_jax.save_pretrained(params, path, format=fmt, model=model)
        except ValueError as e:  # a refusal names what the format cannot hold (not always `name`)
            assert f"format {fmt!r} cannot represent" in str(e), e
            continue
        needed = convert.reload_overrides(params, model.config, fmt)
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
        config.model = common.model_config(None, pool=pool)
        with pytest.raises(ValueError, match="pool='none'"):
            train_state.model_config_for(config, num_classes=10, num_channels=3)
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


# --- Augmentations: the pp.* fields of data/defaults.py (and randaugment.OPS) --------------------

SOURCE = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
PLAIN_PP = dict(PREPROCESSING_DEFAULTS, crop_area_range=None, flip=False)  # every augmentation off


def _normalized(pixels):
    """What the pipeline outputs for these pixels at 16 px with no augmentation."""
    import tensorflow as tf

    image = preprocess.resize(tf.constant(pixels), 16)
    return preprocess.normalize(image).numpy()


def _train(seed, **pp):
    import tensorflow as tf

    fn = preprocess.make_train_fn(ml_collections.ConfigDict(dict(PLAIN_PP, **pp)), 16, 4)
    out = fn(
        {"image": tf.constant(SOURCE), "label": tf.constant(2, tf.int64)},
        tf.constant([seed, 0], tf.int64),
    )
    return out["image"].numpy(), out["label"].numpy()


def _eval(**pp):
    import tensorflow as tf

    fn = preprocess.make_eval_fn(ml_collections.ConfigDict(dict(PLAIN_PP, **pp)), 16, 4)
    out = fn({"image": tf.constant(SOURCE), "label": tf.constant(2, tf.int64)})
    assert out["mask"] == 1.0
    np.testing.assert_array_equal(out["label"], [0, 0, 1, 0])  # eval labels: never smoothed
    return out["image"].numpy()


PLAIN = SOURCE / 127.5 - 1.0
SEEDS = range(8)


def _one_of(image, candidates):
    return any(np.allclose(image, c, atol=1e-5) for c in candidates)


def _check_crop_area_range():
    # A quarter of the area at aspect 1: some 8 x 8 window, upscaled.
    windows = [_normalized(SOURCE[y : y + 8, x : x + 8]) for y in range(9) for x in range(9)]
    for seed in SEEDS:
        image, _ = _train(seed, crop_area_range=(0.25, 0.25), crop_aspect_range=(1.0, 1.0))
        assert _one_of(image, windows)


def _check_crop_aspect_range():
    # Half the area at width / height 2: 8 rows of the full width.
    windows = [_normalized(SOURCE[y : y + 8, :]) for y in range(9)]
    for seed in SEEDS:
        image, _ = _train(seed, crop_area_range=(0.5, 0.5), crop_aspect_range=(2.0, 2.0))
        assert _one_of(image, windows)


def _check_flip():
    images = [_train(seed, flip=True)[0] for seed in SEEDS]
    flipped = [np.allclose(image, PLAIN[:, ::-1], atol=1e-6) for image in images]
    assert all(f or np.allclose(i, PLAIN, atol=1e-6) for i, f in zip(images, flipped))
    assert any(flipped) and not all(flipped)  # random, per example


def _shifted(image, dy, dx):
    out = np.full_like(image, -1.0)  # black fill
    h, w = image.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _check_translate_pixels():
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    seen = set()
    for seed in SEEDS:
        image, _ = _train(seed, translate_pixels=2)
        seen |= {s for s in shifts if np.allclose(image, _shifted(PLAIN, *s), atol=1e-6)}
    assert seen - {(0, 0)}  # it moved the image, by at most 2 pixels each way


def _check_label_smoothing():
    image, label = _train(0, label_smoothing=0.2)
    np.testing.assert_allclose(label, [0.05, 0.05, 0.85, 0.05], rtol=1e-6)
    np.testing.assert_allclose(image, PLAIN, atol=1e-6)


def _check_randaugment_layers():
    changed = 0
    for seed in SEEDS:
        image, _ = _train(seed, randaugment_layers=2)
        np.testing.assert_array_equal(image, _train(seed, randaugment_layers=2)[0])  # seeded
        assert image.min() >= -1.0 and image.max() <= 1.0
        changed += not np.allclose(image, PLAIN, atol=1e-6)
    assert changed >= len(SEEDS) // 2


def _check_randaugment_magnitude():
    weak = [_train(s, randaugment_layers=1, randaugment_magnitude=1)[0] for s in SEEDS]
    strong = [_train(s, randaugment_layers=1, randaugment_magnitude=30)[0] for s in SEEDS]
    assert any(not np.allclose(w, s, atol=1e-6) for w, s in zip(weak, strong))
    assert np.allclose(_train(0, randaugment_magnitude=30)[0], PLAIN)  # no layers: no effect


def _check_eval_crop_fraction():
    np.testing.assert_allclose(
        _eval(eval_crop_fraction=0.5), _normalized(SOURCE[4:12, 4:12]), atol=1e-5
    )
    np.testing.assert_allclose(_eval(), PLAIN, atol=1e-6)


def _check_num_channels():
    # ITU-R 601-2 luma, what tf.image.rgb_to_grayscale documents, rounded to uint8.
    gray = np.round(SOURCE.astype(np.float64) @ [0.2989, 0.5870, 0.1140])[..., None] / 127.5 - 1
    np.testing.assert_allclose(_train(0, num_channels=1)[0], gray, atol=1e-5)
    np.testing.assert_allclose(_eval(num_channels=1), gray, atol=1e-5)


def _check_mixup_alpha(digits_data_dir):
    """Mixup mixes whole batches, so it is checked through the input pipeline itself: each row
    with the one before it (the first with the last), by one weight for the batch."""
    from vit_jax import input_pipeline

    config = input_pipeline.default_data_config()
    config.update(dict(data_dir=digits_data_dir, image_size=8, batch_size=16, eval_batch_size=16))
    config.pp.update(dict(crop_area_range=None, flip=False, num_channels=1))
    plain = next(input_pipeline.get_datasets(config, 0, 1).train_iter())
    config.pp.mixup_alpha = 0.4
    mixed = next(input_pipeline.get_datasets(config, 0, 1).train_iter())
    classes = plain["label"].argmax(-1)
    row = int(np.flatnonzero(classes != np.roll(classes, 1))[0])  # its neighbour's class differs
    lam = mixed["label"][row, classes[row]]
    assert 0.0 < lam < 1.0
    for key in ("image", "label"):
        expected = lam * plain[key] + (1 - lam) * np.roll(plain[key], 1, axis=0)
        np.testing.assert_allclose(mixed[key], expected, atol=1e-5)


AUGMENTATION_CHECKS = {
    "crop_area_range": _check_crop_area_range,
    "crop_aspect_range": _check_crop_aspect_range,
    "flip": _check_flip,
    "translate_pixels": _check_translate_pixels,
    "label_smoothing": _check_label_smoothing,
    "mixup_alpha": _check_mixup_alpha,
    "randaugment_layers": _check_randaugment_layers,
    "randaugment_magnitude": _check_randaugment_magnitude,
    "eval_crop_fraction": _check_eval_crop_fraction,
    "num_channels": _check_num_channels,
}


def test_every_preprocessing_field_has_a_check():
    assert set(AUGMENTATION_CHECKS) == set(PREPROCESSING_DEFAULTS)


@pytest.mark.parametrize("field", list(PREPROCESSING_DEFAULTS))
def test_every_preprocessing_field_does_what_it_says(field, request):
    check = AUGMENTATION_CHECKS[field]
    fixtures = inspect.signature(check).parameters  # mixup's check needs the digits dataset
    check(*(request.getfixturevalue(name) for name in fixtures))
    assert np.allclose(_train(3)[0], PLAIN)  # with every field off, the image comes through as is


@pytest.mark.parametrize("index", range(len(randaugment.OPS)))
def test_every_randaugment_op_is_reachable_and_changes_the_image(index):
    import tensorflow as tf

    op = randaugment.OPS[index]
    low_contrast = tf.constant((SOURCE // 4 + 100).astype(np.uint8))  # auto_contrast has work
    level = tf.constant(1.0)
    by_index = randaugment.apply_op(tf.constant(index), low_contrast, level).numpy()
    np.testing.assert_array_equal(by_index, op(low_contrast, level))  # the switch picks this op
    assert (op is randaugment.identity) == np.array_equal(by_index, low_contrast.numpy())


# --- Datasets: the TFDS builders in vit_jax/tfds_builders/ -------------------------------------


def _digits(tmp_path, digits_data_dir):
    return "digits", digits_data_dir


def _image_folder(tmp_path, digits_data_dir):
    from test_data_image_folder import make_folder

    (tmp_path / "tfds").mkdir()
    return make_folder(tmp_path / "folder"), str(tmp_path / "tfds")


# How a test opens each builder we ship; a new builder needs a line here.
BUILT_IN_DATASETS = {"digits": _digits, "vit_image_folder": _image_folder}


def test_every_shipped_builder_has_a_way_to_open_it():
    import tensorflow_datasets as tfds

    from vit_jax import tfds_builders

    shipped = {
        cls.name
        for module in (getattr(tfds_builders, m) for m in tfds_builders.__all__)
        if inspect.ismodule(module)
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, tfds.core.DatasetBuilder)
    }
    assert shipped == set(BUILT_IN_DATASETS)


@pytest.mark.parametrize("name", list(BUILT_IN_DATASETS))
def test_every_shipped_dataset_trains_and_evaluates_through_the_pipeline(
    name, tmp_path, digits_data_dir
):
    from vit_jax import input_pipeline

    dataset, data_dir = BUILT_IN_DATASETS[name](tmp_path, digits_data_dir)
    config = input_pipeline.default_data_config()
    config.update(dict(dataset=dataset, data_dir=data_dir, image_size=8, batch_size=4))
    config.update(dict(eval_batch_size=4))
    config.pp.update(dict(crop_area_range=None, flip=False))
    data = input_pipeline.get_datasets(config, 0, 1)
    assert data.builder.name == name and len(data.class_names) == data.num_classes >= 2
    batch = next(data.train_iter())
    assert (
        batch["image"].shape == (4, 8, 8, 3)
        and -1 <= batch["image"].min() < batch["image"].max() <= 1
    )
    np.testing.assert_array_equal(batch["label"].sum(-1), 1.0)  # one-hot over num_classes
    assert batch["label"].shape == (4, data.num_classes)
    masks = [b["mask"] for b in data.eval_iter()]
    assert (
        len(masks) == data.num_eval_batches
        and sum(m.sum() for m in masks) == data.num_eval_examples
    )


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
    shardings = train_state.state_shardings(train_state.state_shapes(model, tx), mesh, 2**30)
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
