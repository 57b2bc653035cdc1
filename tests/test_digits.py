"""The `digits` TFDS builder: real scikit-learn digits, fixed stratified splits, read by TFDS."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from vit_jax.data.builders import digits


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.fixture(scope="module")
def splits(digits_data_dir):
    """{'train'|'test': {'image', 'label', 'index'} numpy arrays}, read back through TFDS."""
    builder = tfds.builder("digits", data_dir=digits_data_dir)
    out = {}
    for split in ("train", "test"):
        ds = builder.as_dataset(split=split, batch_size=-1)  # Whole split as one batch.
        out[split] = tfds.as_numpy(ds)
    return out


def test_split_sizes_and_info(digits_data_dir):
    builder = tfds.builder("digits", data_dir=digits_data_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.features["image"].shape == (8, 8, 1)


def test_labels_cover_every_class_in_both_splits(splits):
    for split, examples in splits.items():
        labels = examples["label"]
        assert labels.min() == 0 and labels.max() == 9, split
        assert set(labels.tolist()) == set(range(10)), split
    # Stratified: the test split holds exactly 36 of every digit.
    np.testing.assert_array_equal(np.bincount(splits["test"]["label"]), [36] * 10)


def test_splits_partition_all_1797_digits(splits):
    train, test = splits["train"]["index"], splits["test"]["index"]
    assert len(set(train.tolist())) == len(train) and len(set(test.tolist())) == len(test)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))


def test_images_are_sklearn_digits(splits, sklearn_digits):
    expected = digits.to_uint8(sklearn_digits.images)[..., None]
    for examples in splits.values():
        assert examples["image"].dtype == np.uint8
        np.testing.assert_array_equal(examples["image"], expected[examples["index"]])
        np.testing.assert_array_equal(examples["label"], sklearn_digits.target[examples["index"]])
    # 0..16 really became 0..255 (not e.g. left at 0..16).
    assert splits["train"]["image"].max() == 255


def test_class_means_differ_and_match_sklearn(splits, sklearn_digits):
    train = splits["train"]
    means = np.stack(
        [train["image"][train["label"] == k].mean(0)[..., 0] / 255.0 * 16.0 for k in range(10)]
    )
    rows = train["index"]
    expected = np.stack(
        [sklearn_digits.images[rows][sklearn_digits.target[rows] == k].mean(0) for k in range(10)]
    )
    np.testing.assert_allclose(means, expected, atol=0.05)  # Only uint8 rounding differs.
    distances = np.linalg.norm((means[:, None] - means[None]).reshape(10, 10, -1), axis=-1)
    # Every pair of digits looks different on average (pixel units 0..16, 64 pixels).
    assert distances[~np.eye(10, dtype=bool)].min() > 5.0


def test_split_is_fixed():
    labels = load_digits().target
    first = digits.split_indices(labels)
    np.testing.assert_array_equal(first["test"], digits.split_indices(labels)["test"])
    # Golden values: the split must never change under us (it would change every reported number).
    np.testing.assert_array_equal(first["test"][:8], [3, 7, 13, 19, 36, 38, 43, 48])
    assert int(first["test"].sum()) == 312284


def test_tfds_load_prepares_offline_on_first_use(tmp_path):
    ds = tfds.load("digits", split="test", data_dir=str(tmp_path))
    assert sum(1 for _ in ds) == 360
    assert tfds.builder("digits", data_dir=str(tmp_path)).is_prepared()
