"""Train batches drawn on the devices (`config.data_on_device`): order, augmentation, restarts."""

import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from helpers import REPO, subprocess_env

from vit_jax import sharding
from vit_jax.data import on_device, preprocess

N, SIZE, BATCH = 10, 6, 4


def make_config(**pp):
    defaults = dict(
        flip=False, translate_pixels=0, label_smoothing=0.0, mixup_alpha=0.0,
        crop_area_range=None, randaugment_layers=0,
    )  # fmt: skip
    return ml_collections.ConfigDict(
        dict(pp={**defaults, **pp}, batch_size=BATCH, seed=0, image_size=SIZE)
    )


def indexed_images():
    """Example i is a constant image of value 10 * i (in [0, 255]), label i % 3."""
    images = np.repeat(10.0 * np.arange(N), SIZE * SIZE).reshape(N, SIZE, SIZE, 1)
    return images.astype(np.float32), np.arange(N) % 3


def make_data(mesh=None, **pp):
    images, labels = indexed_images()
    mesh = mesh or sharding.make_mesh({"data": -1, "fsdp": 1})
    return on_device.DeviceTrainData(images, labels, make_config(**pp), 3, mesh)


def example_ids(batch) -> np.ndarray:
    pixels = np.asarray(batch["image"])[..., 0, 0, 0] * 127.5 + 127.5
    return np.round(pixels / 10).astype(int)


def test_each_epoch_visits_every_example_once_in_a_new_order():
    data = make_data()
    stream = np.concatenate([example_ids(data.batch(step)) for step in range(5)])  # 2 epochs
    first, second = stream[:N], stream[N:]
    assert sorted(first) == sorted(second) == list(range(N))
    assert not np.array_equal(first, second)


def test_labels_follow_their_images():
    data = make_data()
    batch = data.batch(3)
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 1) and batch["label"].shape == (BATCH, 3)
    np.testing.assert_array_equal(np.argmax(batch["label"], -1), example_ids(batch) % 3)


AUGMENTED = dict(flip=True, translate_pixels=2, label_smoothing=0.1)


@pytest.mark.parametrize(
    "augment",
    [
        dict(AUGMENTED, mixup_alpha=0.2),
        dict(AUGMENTED, rotate_degrees=10.0, scale_range=(0.9, 1.1)),
    ],
    ids=["mixup", "rotate_and_scale"],
)
def test_a_restart_and_grouped_steps_give_the_same_batches(augment):
    data = make_data(**augment)
    singles = [data.batch(step) for step in range(6)]
    (_, restarted), *_ = data.batches(4, [1])
    np.testing.assert_array_equal(restarted["image"][0], singles[4]["image"])
    (size, padded), *_ = data.batches(4, [2], stack=3)  # the trainer's K=3 program, 2 steps used
    assert size == 2 and padded["image"].shape[0] == 3
    np.testing.assert_array_equal(padded["image"][1], singles[5]["image"])
    group = make_data(**augment).batch(2, size=3)
    for k in range(3):
        for key in ("image", "label"):
            np.testing.assert_allclose(group[key][k], singles[2 + k][key], rtol=1e-6)


def test_translation_shifts_by_at_most_the_limit_and_fills_with_black():
    images = np.arange(N * SIZE * SIZE, dtype=np.float32).reshape(N, SIZE, SIZE, 1) % 200 + 50
    labels = np.zeros(N, int)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    data = on_device.DeviceTrainData(images, labels, make_config(translate_pixels=2), 3, mesh)
    shifts = set()
    for step in range(3):
        out = np.asarray(data.batch(step)["image"]) * 127.5 + 127.5
        for row in out:
            matches = [
                (dy, dx)
                for source in images
                for dy in range(-2, 3)
                for dx in range(-2, 3)
                if np.allclose(row, shifted(source, dy, dx), atol=1e-3)
            ]
            assert matches, "every output is a source image shifted by at most 2 pixels"
            shifts.add(matches[0])
    assert len(shifts) > 3  # the shift varies from example to example


def shifted(image, dy, dx):
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    return padded[2 - dy : 2 - dy + SIZE, 2 - dx : 2 - dx + SIZE]


def test_flip_mirrors_some_examples_and_keeps_the_rest():
    images = np.tile(np.arange(SIZE, dtype=np.float32), (N, SIZE, 1))[..., None]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    data = on_device.DeviceTrainData(images, np.zeros(N, int), make_config(flip=True), 3, mesh)
    rows = np.concatenate([np.asarray(data.batch(s)["image"]) for s in range(5)])[:, 0, :, 0]
    flipped = rows[:, 0] > rows[:, -1]
    assert 0 < flipped.sum() < len(rows)


def test_mixup_mixes_each_row_with_the_previous_one_by_one_lambda():
    data = make_data(mixup_alpha=0.4, label_smoothing=0.1)
    plain = make_data(label_smoothing=0.1)
    for step in range(3):
        mixed, clean = data.batch(step), plain.batch(step)
        np.testing.assert_allclose(np.sum(mixed["label"], -1), 1.0, rtol=1e-5)
        # The same examples in the same order; lam recovered from the images must fit the labels.
        x, y = np.asarray(clean["image"])[:, 0, 0, 0], np.asarray(mixed["image"])[:, 0, 0, 0]
        rolled = np.roll(x, 1)
        varying = np.abs(x - rolled) > 1e-3
        lam = np.mean((y - rolled)[varying] / (x - rolled)[varying])
        expected = lam * clean["label"] + (1 - lam) * np.roll(clean["label"], 1, axis=0)
        np.testing.assert_allclose(mixed["label"], expected, atol=1e-4)
        assert 0 <= lam <= 1


@pytest.mark.parametrize(
    "pp, batch, match",
    [
        (dict(randaugment_layers=2), BATCH, "randaugment_layers=2"),
        (dict(crop_area_range=(0.1, 1.0)), BATCH, "crop_area_range"),
        ({}, N + 1, "batch_size=11 is larger than the train split"),
    ],
)
def test_settings_it_cannot_do_are_refused_by_name(pp, batch, match):
    images, labels = indexed_images()
    config = make_config(**pp)
    config.batch_size = batch
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    with pytest.raises(ValueError, match=match):
        on_device.DeviceTrainData(images, labels, config, 3, mesh)


TOPOLOGY_SCRIPT = """
import jax, numpy as np, sys
sys.path.insert(0, "tests")
from test_on_device_data import make_data
from vit_jax import sharding
one = make_data(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]),
                flip=True, translate_pixels=2, mixup_alpha=0.2, label_smoothing=0.1)
four = make_data(sharding.make_mesh({"data": 2, "fsdp": 2}),
                 flip=True, translate_pixels=2, mixup_alpha=0.2, label_smoothing=0.1)
for step in range(3):
    a, b = one.batch(step), four.batch(step)
    assert len(b["image"].sharding.device_set) == 4
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6)
print("same")
"""


def test_the_batches_are_the_same_on_one_device_and_on_four():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, "-c", TOPOLOGY_SCRIPT],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "same"


@pytest.mark.parametrize("degrees, scale", [(23.0, 1.15), (-40.0, 0.8), (0.0, 1.3)])
def test_rotation_and_scaling_are_the_same_map_in_jax_and_in_tf(degrees, scale):
    """The on-device path and the tf.data path warp alike (9x7: rows and columns not swapped)."""
    image = np.random.default_rng(1).uniform(0, 255, (9, 7, 2)).astype(np.float32)
    ours = np.asarray(on_device.rotate_and_scale(image, degrees, scale))
    theirs = preprocess.rotate_and_scale(tf.constant(image), degrees, scale).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert not np.allclose(ours, image)


def test_a_quarter_turn_is_rot90_and_no_warp_is_the_identity():
    image = np.random.default_rng(2).uniform(0, 255, (7, 7, 1)).astype(np.float32)
    for warp in (on_device.rotate_and_scale, preprocess.rotate_and_scale):
        np.testing.assert_allclose(np.asarray(warp(image, 0.0, 1.0)), image, atol=1e-3)
        # counter-clockwise as displayed (row 0 on top), np.rot90's direction
        np.testing.assert_allclose(np.asarray(warp(image, 90.0, 1.0)), np.rot90(image), atol=1e-3)


def test_random_rotations_vary_per_example_keep_the_centre_and_fill_with_black():
    images = np.full((N, SIZE + 1, SIZE + 1, 1), 200.0, np.float32)  # odd: a centre pixel
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    config = make_config(rotate_degrees=30.0)
    config.image_size = SIZE + 1
    data = on_device.DeviceTrainData(images, np.zeros(N, int), config, 3, mesh)
    out = np.concatenate([np.asarray(data.batch(s)["image"]) for s in range(3)]) * 127.5 + 127.5
    np.testing.assert_allclose(out[:, SIZE // 2, SIZE // 2], 200.0, atol=1e-3)
    corners = out[:, 0, 0, 0]
    assert corners.min() < 200.0 - 1 and len(np.unique(corners.round(2))) > 3  # black comes in
    # a zoom in by a fixed 1.5 is that warp of every example, and nothing black comes in
    config = make_config(scale_range=(1.5, 1.5))
    config.image_size = SIZE + 1
    data = on_device.DeviceTrainData(images, np.zeros(N, int), config, 3, mesh)
    np.testing.assert_allclose(np.asarray(data.batch(0)["image"]) * 127.5 + 127.5, 200.0, atol=1e-3)
