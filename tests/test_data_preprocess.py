"""Preprocessing ops and RandAugment: shapes, dtypes, semantics, determinism."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import preprocess, randaugment

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
SEED = tf.constant([3, 4], tf.int64)


def seed(i):
    return tf.constant([i, 0], tf.int64)


@pytest.mark.parametrize("op", randaugment.OPS, ids=lambda op: op.__name__)
@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_op_shapes_and_identity_at_level_zero(op, channels):
    image = tf.constant(IMAGE[..., :channels])
    for level in (-1.0, 1.0, 3.0):  # 3.0 is magnitude 30, the largest allowed.
        out = op(image, tf.constant(level))
        assert out.shape == image.shape and out.dtype == tf.uint8
    if op not in (randaugment.auto_contrast, randaugment.equalize):  # These have no level.
        np.testing.assert_array_equal(op(image, tf.constant(0.0)), image)


def test_randaugment_op_semantics():
    image = tf.constant(IMAGE)
    level = tf.constant(1.0)
    np.testing.assert_array_equal(randaugment.solarize(image, level), 255 - IMAGE)
    np.testing.assert_array_equal(randaugment.posterize(image, level), IMAGE & 0xF0)
    darker = randaugment.brightness(image, -level).numpy()  # Keeps 10 % of the light.
    np.testing.assert_allclose(darker, IMAGE * 0.1, atol=0.51)
    rotated = randaugment.rotate(image, tf.constant(3.0)).numpy()  # 90 degrees, square image.
    assert any(np.array_equal(rotated, np.rot90(IMAGE, k)) for k in (1, -1))
    low_contrast = (IMAGE // 4 + 100).astype(np.uint8)
    stretched = randaugment.auto_contrast(tf.constant(low_contrast), level).numpy()
    assert (stretched.min(axis=(0, 1)) == 0).all() and (stretched.max(axis=(0, 1)) == 255).all()
    equalized = randaugment.equalize(tf.constant(low_contrast), level).numpy()
    assert equalized.min() <= 8 and equalized.max() >= 240  # Spread over the full range.


def test_randaugment_is_deterministic_per_seed():
    image = tf.constant(IMAGE)
    a = randaugment.randaugment(image, seed(1), num_layers=2, magnitude=10)
    b = randaugment.randaugment(image, seed(1), num_layers=2, magnitude=10)
    np.testing.assert_array_equal(a, b)
    outputs = {randaugment.randaugment(image, seed(i), 2, 10).numpy().tobytes() for i in range(8)}
    assert len(outputs) > 4  # Different seeds pick different ops.


def test_jpeg_crop_fast_path_matches_full_decode():
    smooth = tf.image.resize(tf.constant(IMAGE[None], tf.float32), [64, 48])[0]
    jpeg = tf.io.encode_jpeg(tf.cast(smooth, tf.uint8), quality=95)
    window = preprocess.inception_crop_window(SEED, (0.2, 0.5), (3 / 4, 4 / 3))
    cropped = preprocess.decode_crop(jpeg, 3, window)  # decode_and_crop_jpeg.
    y, x, h, w = (int(v) for v in window(tf.constant([64, 48, 3])))
    full = tf.io.decode_jpeg(jpeg, channels=3)[y : y + h, x : x + w]
    assert cropped.shape == full.shape
    assert 0.2 * 64 * 48 * 0.9 <= h * w <= 0.5 * 64 * 48 * 1.1
    np.testing.assert_allclose(cropped.numpy(), full.numpy(), atol=3)
    png = tf.io.encode_png(tf.cast(smooth, tf.uint8))
    np.testing.assert_array_equal(  # PNG goes through the generic path; same window.
        preprocess.decode_crop(png, 3, window), tf.cast(smooth, tf.uint8)[y : y + h, x : x + w]
    )


def test_central_crop_window_and_channels():
    y, x, h, w = (int(v) for v in preprocess.central_crop_window(0.5)(tf.constant([100, 60, 3])))
    assert (y, x, h, w) == (35, 15, 30, 30)
    gray = preprocess.to_channels(tf.constant(IMAGE), 1)
    assert gray.shape == (16, 16, 1) and gray.dtype == tf.uint8
    rgb = preprocess.to_channels(gray, 3).numpy()
    assert (rgb[..., 0] == rgb[..., 2]).all()
    rgba = np.concatenate([IMAGE, np.full((16, 16, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(preprocess.to_channels(tf.constant(rgba), 3), IMAGE)


def test_normalize_one_hot_and_mixup():
    np.testing.assert_allclose(preprocess.normalize(tf.constant([0, 255], tf.uint8)), [-1, 1])
    smoothed = preprocess.one_hot(tf.constant(2), 4, smoothing=0.2).numpy()
    np.testing.assert_allclose(smoothed, [0.05, 0.05, 0.85, 0.05], rtol=1e-6)
    batch = {"image": tf.constant(RNG.normal(size=(4, 2, 2, 1)), tf.float32)}
    batch["label"] = tf.one_hot([0, 1, 2, 3], 4)
    mixed = preprocess.mixup(batch, SEED, alpha=0.5)
    labels = mixed["label"].numpy()
    lam = labels[0, 0]
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    rolled = np.roll(batch["image"].numpy(), 1, axis=0)
    expected = lam * batch["image"].numpy() + (1 - lam) * rolled
    np.testing.assert_allclose(mixed["image"], expected, rtol=1e-5, atol=1e-6)
