"""Preprocessing ops for tf.data: decode, crop, resize, flip, normalize, labels, mixup.

Everything here runs inside tf.data graphs. Randomness is stateless: each random op takes an
explicit `seed` (shape-[2] int tensor), so an example's augmentation is a pure function of the
example and its seed, which is what makes the pipeline reproducible and restartable.

Images arrive either as encoded bytes (TFDS `Image` features read with `SkipDecoding`, so decoding
happens after shuffling, and only inside the crop for JPEGs) or as already-decoded uint8 HWC
tensors (datasets that store raw arrays).
"""

import math
from collections.abc import Callable

import tensorflow as tf

from vit_jax.data import randaugment

# (height, width, channels) of the source image -> (y, x, height, width) to keep.
CropWindow = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]]


def fold_in(seed: tf.Tensor, *values) -> tf.Tensor:
    """A new stateless seed derived from `seed` and each of `values` (ints or int tensors)."""
    for value in values:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 HWC with 1, 3 or 4 channels -> `channels` (1 or 3) channels; alpha is dropped."""
    have = image.shape[-1]
    if have is None:
        raise ValueError("Decoded images need a static channel count; got shape (H, W, None).")
    if have == 4:
        image, have = image[..., :3], 3
    if have == channels:
        return image
    if channels == 3:
        return tf.image.grayscale_to_rgb(image)
    return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), tf.uint8)


def decode_crop(image: tf.Tensor, channels: int, window: CropWindow | None = None) -> tf.Tensor:
    """Decodes `image` (bytes or uint8 HWC) to uint8 with `channels`, cropped to `window`."""
    if image.dtype != tf.string:
        image = to_channels(image, channels)
        return image if window is None else _crop(image, window(tf.shape(image)))
    if window is None:
        decoded = tf.io.decode_image(image, channels=channels, expand_animations=False)
    else:

        def jpeg():  # Decodes only the pixels inside the window: much faster for small crops.
            y, x, h, w = window(tf.image.extract_jpeg_shape(image))
            return tf.image.decode_and_crop_jpeg(image, tf.stack([y, x, h, w]), channels=channels)

        def other():
            full = tf.io.decode_image(image, channels=channels, expand_animations=False)
            return _crop(full, window(tf.shape(full)))

        decoded = tf.cond(tf.io.is_jpeg(image), jpeg, other)
    decoded.set_shape([None, None, channels])
    return decoded


def _crop(image, window):
    y, x, h, w = window
    return image[y : y + h, x : x + w]


def inception_crop_window(seed, area_range, aspect_range) -> CropWindow:
    """Random window covering `area_range` of the image with aspect in `aspect_range`."""

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.cast(shape, tf.int32),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=aspect_range,
            area_range=area_range,
            use_image_if_no_bounding_boxes=True,
        )
        return begin[0], begin[1], size[0], size[1]

    return window


def central_crop_window(fraction: float) -> CropWindow:
    """Central square whose side is `fraction` of the shorter image side."""

    def window(shape):
        h, w = shape[0], shape[1]
        side = tf.cast(tf.round(fraction * tf.cast(tf.minimum(h, w), tf.float32)), h.dtype)
        side = tf.maximum(side, 1)
        return (h - side) // 2, (w - side) // 2, side, side

    return window


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """-> float32 (size, size, C) in [0, 255]; antialiased, so downscaling does not alias."""
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def random_translate(image: tf.Tensor, seed, pixels: int) -> tf.Tensor:
    """Shifts by up to `pixels` in each direction, filling with black (pad, then random crop)."""
    padded = tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)


def rotate_and_scale(image: tf.Tensor, degrees, scale) -> tf.Tensor:
    """Rotates `image` (HWC float) by `degrees` (counter-clockwise as displayed) and zooms it by
    `scale` about its centre: bilinear, black outside (`on_device.rotate_and_scale` in JAX)."""
    angle = tf.cast(degrees, tf.float32) * math.pi / 180.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1.0) / 2
    cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1.0) / 2
    # Each output (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2): the inverse map.
    transform = tf.stack(
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]


def random_rotate_and_scale(image: tf.Tensor, seed, degrees: float, scale_range) -> tf.Tensor:
    """`rotate_and_scale` by an angle uniform in ±`degrees` and a factor uniform in `scale_range`
    (None: 1)."""
    angle_seed, scale_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    angle = tf.random.stateless_uniform([], angle_seed, -degrees, degrees)
    low, high = scale_range or (1.0, 1.0)
    return rotate_and_scale(image, angle, tf.random.stateless_uniform([], scale_seed, low, high))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] -> [-1, 1], the convention of the published ViT checkpoints."""
    return (tf.cast(image, tf.float32) - 127.5) / 127.5


def one_hot(label: tf.Tensor, num_classes: int, smoothing: float = 0.0) -> tf.Tensor:
    """float32 one-hot; with smoothing, (1 - s) on the class plus s spread over all classes."""
    off = smoothing / num_classes
    return tf.one_hot(label, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def mixup(batch: dict, seed, alpha: float) -> dict:
    """Mixes each example with its neighbour in the batch, with one lam ~ Beta(alpha, alpha)."""
    g1, g2 = (tf.random.stateless_gamma([], fold_in(seed, i), alpha) for i in (1, 2))
    lam = g1 / (g1 + g2)
    mixed = dict(batch)
    for key in ("image", "label"):
        x = batch[key]
        mixed[key] = lam * x + (1.0 - lam) * tf.roll(x, shift=1, axis=0)
    return mixed


def make_train_fn(pp, image_size: int, num_classes: int):
    """(example, seed) -> {'image': float32 (S, S, C) in [-1, 1], 'label': float32 (K,)}."""
    channels = pp.num_channels

    def preprocess(example, seed):
        crop_seed, flip_seed, shift_seed, ra_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 4)
        )
        window = None
        if pp.crop_area_range is not None:
            window = inception_crop_window(
                crop_seed, tuple(pp.crop_area_range), tuple(pp.crop_aspect_range)
            )
        image = resize(decode_crop(example["image"], channels, window), image_size)
        if pp.flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        if pp.get("rotate_degrees") or pp.get("scale_range"):
            image = random_rotate_and_scale(
                image, fold_in(shift_seed, 1), float(pp.rotate_degrees), pp.scale_range
            )
        if pp.translate_pixels:
            image = random_translate(image, shift_seed, pp.translate_pixels)
        if pp.randaugment_layers:
            image = randaugment.randaugment(
                to_uint8(image), ra_seed, pp.randaugment_layers, pp.randaugment_magnitude
            )
        return {
            "image": normalize(image),
            "label": one_hot(example["label"], num_classes, pp.label_smoothing),
        }

    return preprocess


def make_eval_fn(pp, image_size: int, num_classes: int):
    """example -> {'image': float32 (S, S, C), 'label': plain one-hot, 'mask': 1.0}."""
    window = None if pp.eval_crop_fraction == 1.0 else central_crop_window(pp.eval_crop_fraction)

    def preprocess(example):
        image = resize(decode_crop(example["image"], pp.num_channels, window), image_size)
        return {
            "image": normalize(image),
            "label": one_hot(example["label"], num_classes),
            "mask": tf.constant(1.0),
        }

    return preprocess
