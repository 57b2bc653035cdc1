"""Every data-side choice is wired end to end (ARCHITECTURE.md: "Where does a new X go").

Every preprocessing field (data/defaults.py PREPROCESSING_DEFAULTS) has the effect it names, checked
against what it means on a tiny image; every RandAugment op (randaugment.OPS) is reachable and
changes an image; every TFDS builder we ship trains and evaluates through the input pipeline. The
model and training side is in test_registries.py.
"""

import inspect

import ml_collections
import numpy as np
import pytest

from vit_jax.data import preprocess, randaugment
from vit_jax.data.defaults import PREPROCESSING_DEFAULTS

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


def _check_rotate_degrees():
    import tensorflow as tf
    from scipy.optimize import minimize_scalar

    def angle_of(image):  # the rotation of the source (black outside) closest to `image`
        def error(degrees):
            warped = preprocess.rotate_and_scale(tf.constant(PLAIN + 1.0), degrees, 1.0).numpy()
            return np.abs(image - (warped - 1.0)).max()

        coarse = min(np.arange(-20.0, 20.5, 1.0), key=error)
        bounds = (coarse - 1, coarse + 1)
        return minimize_scalar(error, bounds=bounds, method="bounded", options=dict(xatol=1e-5))

    angles = []
    for seed in SEEDS:
        best = angle_of(_train(seed, rotate_degrees=20.0)[0])
        assert best.fun < 1e-3 and abs(best.x) <= 20.0 + 1e-3, (seed, best)
        angles.append(best.x)
    assert np.ptp(angles) > 5  # the angle varies from seed to seed


def _check_scale_range():
    import tensorflow as tf

    image, _ = _train(0, scale_range=(2.0, 2.0))  # a fixed zoom: exactly that warp
    zoomed = preprocess.rotate_and_scale(tf.constant(PLAIN + 1.0), 0.0, 2.0).numpy() - 1.0
    np.testing.assert_allclose(image, zoomed, atol=1e-4)
    sizes = {float(np.abs(_train(s, scale_range=(0.5, 1.0))[0] + 1.0).sum()) for s in SEEDS}
    assert len(sizes) == len(SEEDS)  # a random zoom out per seed (more or less black border)


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
    from vit_jax.data import pipeline

    config = pipeline.default_data_config()
    config.update(dict(data_dir=digits_data_dir, image_size=8, batch_size=16, eval_batch_size=16))
    config.pp.update(dict(crop_area_range=None, flip=False, num_channels=1))
    plain = next(pipeline.get_datasets(config, 0, 1).train_iter())
    config.pp.mixup_alpha = 0.4
    mixed = next(pipeline.get_datasets(config, 0, 1).train_iter())
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
    "rotate_degrees": _check_rotate_degrees,
    "scale_range": _check_scale_range,
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


# --- Datasets: the TFDS builders in vit_jax/data/builders/ -------------------------------------


def _digits(tmp_path, digits_data_dir):
    return "digits", digits_data_dir


def _image_folder(tmp_path, digits_data_dir):
    from test_data_image_folder import make_folder

    (tmp_path / "tfds").mkdir()
    return make_folder(tmp_path / "folder"), str(tmp_path / "tfds")


def _fractaldb(tmp_path, digits_data_dir):
    return "fractaldb/c3_i4_r8", str(tmp_path)  # prepared on first use, offline, in a second


# How a test opens each builder we ship; a new builder needs a line here.
BUILT_IN_DATASETS = {"digits": _digits, "vit_image_folder": _image_folder, "fractaldb": _fractaldb}


def test_every_shipped_builder_has_a_way_to_open_it():
    import tensorflow_datasets as tfds

    from vit_jax.data import builders

    shipped = {
        cls.name
        for module in (getattr(builders, m) for m in builders.__all__)
        if inspect.ismodule(module)
        for cls in vars(module).values()
        if inspect.isclass(cls) and issubclass(cls, tfds.core.DatasetBuilder)
    }
    assert shipped == set(BUILT_IN_DATASETS)


@pytest.mark.parametrize("name", list(BUILT_IN_DATASETS))
def test_every_shipped_dataset_trains_and_evaluates_through_the_pipeline(
    name, tmp_path, digits_data_dir
):
    from vit_jax.data import pipeline

    dataset, data_dir = BUILT_IN_DATASETS[name](tmp_path, digits_data_dir)
    config = pipeline.default_data_config()
    config.update(dict(dataset=dataset, data_dir=data_dir, image_size=8, batch_size=4))
    config.update(dict(eval_batch_size=4))
    config.pp.update(dict(crop_area_range=None, flip=False))
    data = pipeline.get_datasets(config, 0, 1)
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
