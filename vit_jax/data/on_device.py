"""Train batches made on the devices, for a small dataset held whole in device memory.

For a tiny model on a small dataset (the digits main job) the host, not the model, sets the pace:
tf.data's per-example work takes as much CPU as the train step itself. With `config.data_on_device`
the train split is decoded and resized once, put on every device, and each global batch is drawn
and augmented there by one jitted function of (seed, step), dispatched ahead of the step:

  order     one permutation of the split per epoch, from (seed, epoch): every example once an epoch
  augment   flip, random rotation and scaling (bilinear, zero fill) and random translation (zero
            fill) per example, keyed on its (epoch, index)
  labels    one-hot with label smoothing; mixup with one lam per global batch, row k mixed with
            row k - 1 of the global batch (the tf.data pipeline's convention)

Every value depends only on the seed and the global position, so the batches are the same on any
process and device count, and a resumed run continues exactly. The random streams are JAX's, not
tf.data's: a run with it on is not the same run as one with it off (the workdir check tells them
apart). Random-resized crops and RandAugment are tf.data only; `unsupported()` says what stands in
the way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vit_jax import sharding as sharding_lib

MAX_BYTES = 512 * 2**20  # the decoded split, float32, on every device
_ORDER, _AUGMENT, _MIXUP = 0, 1, 2  # streams folded from the seed
_AFFINE = 3  # folded into an example's augment key


def unsupported(pp, num_examples: int, batch_size: int, image_shape) -> str | None:
    """Why these settings cannot make their batches on the devices (None: they can)."""
    if pp.crop_area_range is not None:
        return f"config.pp.crop_area_range={pp.crop_area_range} (random-resized crops need tf.data)"
    if pp.randaugment_layers:
        return f"config.pp.randaugment_layers={pp.randaugment_layers} (RandAugment needs tf.data)"
    if batch_size > num_examples:
        return f"config.batch_size={batch_size} is larger than the train split ({num_examples})"
    size = num_examples * int(np.prod(image_shape)) * 4
    if size > MAX_BYTES:
        return f"the decoded train split takes {size / 2**20:.0f} MiB (at most {MAX_BYTES >> 20})"
    return None


class _Augment(NamedTuple):
    """The augmentation settings this path implements (hashable: a key of the compiled cache)."""

    flip: bool
    translate_pixels: int
    label_smoothing: float
    mixup_alpha: float
    rotate_degrees: float
    scale_range: tuple[float, float] | None

    @classmethod
    def of(cls, pp) -> _Augment:
        scale = pp.get("scale_range")
        return cls(
            bool(pp.flip), int(pp.translate_pixels), float(pp.label_smoothing),
            float(pp.mixup_alpha), float(pp.get("rotate_degrees", 0.0)),
            None if scale is None else (float(scale[0]), float(scale[1])),
        )  # fmt: skip


def rotate_and_scale(image, degrees, scale):
    """Rotates `image` (HWC) by `degrees` (counter-clockwise as displayed, row 0 on top) and
    zooms it by `scale` about its centre: bilinear, black outside (each output pixel samples the
    input where the inverse map sends it; `preprocess.rotate_and_scale` is the same in TF)."""
    h, w = image.shape[:2]
    angle = jnp.deg2rad(degrees)
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    y, x = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")
    source_y = cos * y + sin * x + (h - 1) / 2
    source_x = cos * x - sin * y + (w - 1) / 2
    channels = [
        jax.scipy.ndimage.map_coordinates(image[..., c], [source_y, source_x], order=1, cval=0.0)
        for c in range(image.shape[-1])
    ]
    return jnp.stack(channels, axis=-1)


def _augment(image, key, aug: _Augment):
    """One example: [0, 255] float HWC -> augmented, still [0, 255]."""
    flip_key, shift_key = jax.random.split(key)
    if aug.flip:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
    if aug.rotate_degrees or aug.scale_range:
        # Streams of their own: runs without rotation or scaling keep their batches bit for bit.
        angle_key, scale_key = jax.random.split(jax.random.fold_in(key, _AFFINE))
        r = aug.rotate_degrees
        degrees = jax.random.uniform(angle_key, (), minval=-r, maxval=r)
        low, high = aug.scale_range or (1.0, 1.0)
        scale = jax.random.uniform(scale_key, (), minval=low, maxval=high)
        image = rotate_and_scale(image, degrees, scale)
    pixels = aug.translate_pixels
    if pixels:
        padded = jnp.pad(image, ((pixels, pixels), (pixels, pixels), (0, 0)))
        corner = jax.random.randint(shift_key, (2,), 0, 2 * pixels + 1)
        image = jax.lax.dynamic_slice(padded, (corner[0], corner[1], 0), image.shape)
    return image


def _one_step(images, labels, key, epoch, offset, *, aug, batch_size, num_classes):
    """The global batch whose first example is at (epoch, offset) of the stream."""
    n = images.shape[0]
    order_key, augment_key = (jax.random.fold_in(key, s) for s in (_ORDER, _AUGMENT))
    position = offset + jnp.arange(batch_size)  # batch_size <= n: at most two epochs
    epochs = epoch + position // n
    within = position % n
    permutations = jnp.stack(
        [jax.random.permutation(jax.random.fold_in(order_key, epoch + i), n) for i in (0, 1)]
    )
    index = permutations[epochs - epoch, within]
    keys = jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(augment_key, e), i))(
        epochs, within
    )
    batch_images = jax.vmap(functools.partial(_augment, aug=aug))(images[index], keys)
    s = aug.label_smoothing
    targets = jax.nn.one_hot(labels[index], num_classes) * (1.0 - s) + s / num_classes
    return (batch_images - 127.5) / 127.5, targets


def _mix(images, targets, key, step, alpha):
    lam = jax.random.beta(jax.random.fold_in(jax.random.fold_in(key, _MIXUP), step), alpha, alpha)
    mixed = [lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0) for x in (images, targets)]
    return mixed[0], mixed[1]


def _steps(images, labels, key, epochs, offsets, steps, *, aug, batch_size, num_classes, squeeze):
    one = functools.partial(_one_step, aug=aug, batch_size=batch_size, num_classes=num_classes)
    x, y = jax.vmap(one, in_axes=(None, None, None, 0, 0))(images, labels, key, epochs, offsets)
    if aug.mixup_alpha > 0:
        x, y = jax.vmap(_mix, in_axes=(0, 0, None, 0, None))(x, y, key, steps, aug.mixup_alpha)
    if squeeze:
        x, y = x[0], y[0]
    return {"image": x, "label": y}


@functools.lru_cache(maxsize=32)
def _compiled(aug: _Augment, batch_size: int, num_classes: int, squeeze: bool, sharding):
    """One jitted batch maker per setting (shared by every DeviceTrainData that needs it)."""
    fn = functools.partial(
        _steps, aug=aug, batch_size=batch_size, num_classes=num_classes, squeeze=squeeze
    )
    return jax.jit(fn, out_shardings={"image": sharding, "label": sharding})


class DeviceTrainData:
    """The train split on every device and the jitted function that draws batches from it."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, config, num_classes: int, mesh: Mesh
    ):
        reason = unsupported(config.pp, len(images), config.batch_size, images.shape[1:])
        if reason:
            raise ValueError(f"config.data_on_device=True cannot be used: {reason}")
        replicated = sharding_lib.replicated(mesh)
        # Every process passes the same whole split; each device gets all of it.
        self._images, self._labels = (
            jax.make_array_from_callback(a.shape, replicated, lambda idx, a=a: a[idx])
            for a in (np.asarray(images, np.float32), np.asarray(labels, np.int32))
        )
        self._n, self._batch = len(images), config.batch_size
        self._key = jax.random.key(config.seed)
        self._aug, self._num_classes = _Augment.of(config.pp), num_classes
        self._single = sharding_lib.batch_sharding(mesh)
        self._stacked = sharding_lib.stacked_batch_sharding(mesh)

    def batch(self, first_step: int, size: int = 1, stacked: bool = False) -> dict[str, jax.Array]:
        """The global batches of steps first_step .. first_step + size - 1, stacked on a new axis 0
        when size > 1 or `stacked`. Each step's batch has the same bits whatever the size."""
        steps = np.arange(first_step, first_step + size, dtype=np.int64)
        epochs, offsets = np.divmod(steps * self._batch, self._n)  # exact ints, on the host
        squeeze = size == 1 and not stacked
        sharding = self._single if squeeze else self._stacked
        fn = _compiled(self._aug, self._batch, self._num_classes, squeeze, sharding)
        return fn(
            self._images, self._labels, self._key,
            epochs.astype(np.int32), offsets.astype(np.int32), steps.astype(np.int32),
        )  # fmt: skip

    def batches(
        self, start_step: int, sizes: Iterable[int], stack: int = 1
    ) -> Iterator[tuple[int, dict]]:
        """(size, batches) per planned dispatch, as `dispatch.to_devices` yields them: always
        `stack` steps' batches (one compiled function), of which the dispatch uses `size`."""
        step = start_step
        for size in sizes:
            yield size, self.batch(step, stack, stacked=True)
            step += size


def from_data(data, config, mesh: Mesh) -> DeviceTrainData:
    """`data`'s train split, decoded and resized once on the host, then put on the devices."""
    reason = unsupported(config.pp, data.num_train_examples, config.batch_size, data.image_shape)
    examples = getattr(data, "in_memory_train", lambda: None)()
    if reason is None and examples is None:
        reason = "the train split is not held in memory (too large, or streamed)"
    if reason:
        raise ValueError(f"config.data_on_device=True cannot be used: {reason}; set it to False")
    import tensorflow as tf

    from vit_jax.data import preprocess

    channels, size = config.pp.num_channels, config.image_size

    def decode(example):
        image = preprocess.resize(preprocess.decode_crop(example["image"], channels), size)
        return {"image": image, "label": example["label"]}

    ds = tf.data.Dataset.from_tensor_slices(examples).map(decode).batch(1024)
    parts = list(ds.as_numpy_iterator())
    images = np.concatenate([p["image"] for p in parts])
    labels = np.concatenate([p["label"] for p in parts])
    return DeviceTrainData(images, labels, config, data.num_classes, mesh)
