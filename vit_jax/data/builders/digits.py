"""`digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset.

The images ship inside scikit-learn (`sklearn.datasets.load_digits`), so the dataset prepares
offline, in about a second, the first time it is asked for::

    import vit_jax.data.builders  # registers the builder
    ds = tfds.load('digits', split='train', data_dir=...)

Splits are fixed: `test` holds 36 images of every digit (360), picked by a seeded permutation
that does not depend on the scikit-learn or NumPy version; `train` holds the other 1,437.
Pixels are scikit-learn's 0..16 intensities scaled to 0..255 and stored as (8, 8, 1) uint8 PNGs.
`index` is the row in `load_digits()`, so any example can be traced back to its source.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import progress
from vit_jax.data.builders.own_progress import OwnProgress

NUM_CLASSES = 10
TEST_PER_CLASS = 36
_SPLIT_SEED = 0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 pixel intensities -> 0..255 uint8 (the values the builder stores)."""
    return np.round(np.asarray(images, np.float64) * (255.0 / 16.0)).astype(np.uint8)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of the `train` and `test` splits: `TEST_PER_CLASS` of each class in test."""
    # Legacy RandomState streams are frozen by NumPy, so the split never changes.
    rng = np.random.RandomState(_SPLIT_SEED)
    test = []
    for label in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        test.append(rng.permutation(rows)[:TEST_PER_CLASS])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return {"train": train, "test": test}


class Digits(OwnProgress, tfds.core.GeneratorBasedBuilder):
    """The 8x8 handwritten digits of UCI optdigits, as bundled with scikit-learn."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 1,437 train / 360 test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation="Alpaydin & Kaynak (1998), Optical Recognition of Handwritten Digits, UCI.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data is inside scikit-learn.
        from sklearn.datasets import load_digits  # Only needed to prepare.

        digits = load_digits()
        images = to_uint8(digits.images)[..., None]
        labels = digits.target.astype(np.int64)
        return {
            split: self._generate_examples(images, labels, rows, split)
            for split, rows in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, rows, split):
        with progress.bar(len(rows), f"digits {split}", unit="image", leave=True) as bar:
            for row in rows:
                example = {"image": _png(images[row]), "label": labels[row], "index": int(row)}
                yield int(row), example
                bar.update(1)


def _png(image: np.ndarray) -> bytes:
    # PIL is much faster here than TFDS's own encoder (which builds a TF graph), and PNG is
    # lossless, so the stored pixels are exactly `image`.
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="png")
    return buffer.getvalue()
