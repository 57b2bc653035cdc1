"""RandAugment (Cubuk et al., 2019) in plain TF ops, stateless, for tf.data graphs.

`randaugment(image, seed, num_layers, magnitude)` applies `num_layers` ops, each picked uniformly
from the paper's 14: Identity, AutoContrast, Equalize, Rotate, Solarize, Color, Posterize,
Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY. Every op is always
applied (no per-op probability, as in the paper). Magnitude m uses the usual scale where 10 is the
paper's maximum (AugReg-style configs go to 15-20, so up to 30 is accepted), and every op gets
stronger as m grows (timm's "increasing" variant, which fixes the quirks of the original TF code
where e.g. Solarize and Posterize got weaker as m grew):

  Rotate        +-30 deg * m/10              ShearX/Y      +-0.3 * m/10
  TranslateX/Y  +-45 % of the side * m/10    Solarize      threshold max(0, 256 - 256 * m/10)
  Posterize     drop min(7, round(4 * m/10)) low bits
  Color, Contrast, Brightness, Sharpness: blend factor max(0, 1 +- 0.9 * m/10)

Signed amounts get a random sign. Geometric ops fill uncovered pixels with gray (128). Images are
uint8 (H, W, C) with C = 1 or 3; the output has the same shape and dtype.
"""

import math

import tensorflow as tf

_FILL = 128.0


def _blend(image1, image2, factor):
    """image1 + factor * (image2 - image1), as uint8; factor > 1 extrapolates (then clips)."""
    factor = tf.maximum(factor, 0.0)
    x1, x2 = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
    return tf.cast(tf.round(tf.clip_by_value(x1 + factor * (x2 - x1), 0.0, 255.0)), tf.uint8)


def _grayscale(image):
    """Luma, broadcast back to the image's channel count."""
    if image.shape[-1] == 1:
        return image
    gray = tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))
    return tf.cast(tf.round(tf.tile(gray, [1, 1, 3])), tf.uint8)


def _transform(image, transform):
    """Projective transform (output xy -> input xy, 8 params), nearest pixel, gray fill."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=tf.cast(tf.stack(transform)[None], tf.float32),
        output_shape=tf.stack([h, w]),
        fill_value=_FILL,
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )[0]


def auto_contrast(image, _):
    x = tf.cast(image, tf.float32)
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scaled = (x - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
    return tf.cast(tf.round(tf.where(hi > lo, scaled, x)), tf.uint8)


def equalize(image, _):
    """Per-channel histogram equalization (PIL's ImageOps.equalize)."""

    def channel(c):
        histogram = tf.histogram_fixed_width(tf.cast(c, tf.int32), [0, 255], nbins=256)
        nonzero = tf.boolean_mask(histogram, histogram > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
        lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.where(step > 0, tf.gather(lut, tf.cast(c, tf.int32)), tf.cast(c, tf.int32))

    channels = [channel(image[..., i]) for i in range(image.shape[-1])]
    return tf.cast(tf.stack(channels, -1), tf.uint8)


def rotate(image, level):
    angle = level * 30.0 * math.pi / 180.0
    h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
    w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def solarize(image, level):
    threshold = tf.maximum(256.0 - 256.0 * tf.abs(level), 0.0)
    return tf.where(tf.cast(image, tf.float32) < threshold, image, 255 - image)


def posterize(image, level):
    shift = tf.cast(tf.minimum(tf.round(4.0 * tf.abs(level)), 7.0), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image, level):
    return _blend(_grayscale(image), image, 1.0 + 0.9 * level)


def contrast(image, level):
    mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float32))
    return _blend(tf.fill(tf.shape(image), mean), image, 1.0 + 0.9 * level)


def brightness(image, level):
    return _blend(tf.zeros_like(image), image, 1.0 + 0.9 * level)


def sharpness(image, level):
    """Blend with PIL's SMOOTH-filtered image; the 1-pixel border stays unfiltered."""
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    channels = image.shape[-1]
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    border = tf.ones_like(smooth, dtype=tf.bool)
    inside = tf.pad(border, [[1, 1], [1, 1], [0, 0]])
    smooth = tf.where(inside, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x[0])
    return _blend(smooth, image, 1.0 + 0.9 * level)


def shear_x(image, level):
    return _transform(image, [1.0, 0.3 * level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level):
    return _transform(image, [1.0, 0.0, 0.0, 0.3 * level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, level):
    dx = 0.45 * level * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, [1.0, 0.0, -dx, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, level):
    dy = 0.45 * level * tf.cast(tf.shape(image)[0], tf.float32)
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, -dy, 0.0, 0.0])


def identity(image, _):
    return image


# Each op gets `level` = +-magnitude/10 (sign random); unsigned ops use its absolute value.
OPS = (
    identity,
    auto_contrast,
    equalize,
    rotate,
    solarize,
    color,
    posterize,
    contrast,
    brightness,
    sharpness,
    shear_x,
    shear_y,
    translate_x,
    translate_y,
)


def apply_op(index, image, level):
    """OPS[index](image, level) for a traced `index` (a tf.switch_case over the ops)."""
    branches = [lambda op=op: tf.ensure_shape(op(image, level), image.shape) for op in OPS]
    return tf.switch_case(index, branches)


def randaugment(image, seed, num_layers: int, magnitude: float):
    """Applies `num_layers` random OPS at `magnitude` (0..30) to uint8 (H, W, C) `image`."""
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
        op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
        index = tf.random.stateless_uniform([], op_seed, maxval=len(OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        image = apply_op(index, image, sign * magnitude / 10.0)
    return image
