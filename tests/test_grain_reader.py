"""`config.reader='grain'`: a large ArrayRecord split read in Grain worker processes.

The same global batches as the tf path (`reader='tf'`), bit for bit, with 0 and 2 workers, across
an epoch boundary and from a resumed step; the permutation the workers compute in numpy is
TensorFlow's `index_shuffle`, bit for bit.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from test_input_pipeline import AUGMENTED, global_batches, make_config

from vit_jax.data import grain_reader, pipeline


@pytest.mark.parametrize(
    "max_index, draw, epoch",
    [
        (0, 7, 0),
        (1, 0, 0),  # the most cycle walking: 2 of a 2**16 block
        (399, 123456789, 1),
        (1436, 2**32 - 1, 2**31 + 5),
        (2**16 - 1, 5, 3),  # the block's edge
        (2**16, 2**31, 2),  # the next block size
        (2**20 + 3, 42, 9),
    ],
)
def test_the_numpy_permutation_is_tensorflows_index_shuffle(max_index, draw, epoch):
    rng = np.random.default_rng(max_index)
    index = np.unique(np.concatenate([[0, max_index], rng.integers(0, max_index + 1, 300)]))
    key = grain_reader.epoch_key(draw, epoch)
    expected = tf.random.experimental.index_shuffle(
        tf.constant(index, tf.int64),
        tf.constant([draw & 0xFFFFFFFF, epoch & 0xFFFFFFFF], tf.int64),
        max_index,
    ).numpy()
    np.testing.assert_array_equal(grain_reader.index_shuffle(index, key, max_index), expected)
    if max_index < 2**16:  # a permutation: every index once
        everything = grain_reader.index_shuffle(np.arange(max_index + 1), key, max_index)
        assert sorted(everything) == list(range(max_index + 1))


def test_a_small_splits_whole_epoch_permutation_gives_the_same_indices():
    positions = np.arange(1437 * 3 - 50, 1437 * 3 + 50)  # across an epoch boundary
    epochs_seen = {}
    cached = grain_reader.global_indices(positions, 1437, 99, epochs_seen)
    np.testing.assert_array_equal(cached, grain_reader.global_indices(positions, 1437, 99))
    assert sorted(epochs_seen) == [2, 3]
    grain_reader.global_indices(positions + 1437 * 2, 1437, 99, epochs_seen)
    assert sorted(epochs_seen) == [4, 5]  # the older epochs are dropped


# 400 examples, 32 a batch: steps 10..14 cross the first epoch boundary (position 400).
START, STEPS = 10, 5


@pytest.fixture(scope="module")
def tf_batches(digits_array_record_dir):
    config = make_config(digits_array_record_dir, **AUGMENTED, in_memory_max_bytes=0, reader="tf")
    assert pipeline.get_datasets(config, 0, 2).order == "global"
    return global_batches(config, 2, STEPS, start_step=START)


def _children() -> set[int]:
    """This process's live child processes (Linux /proc), but for multiprocessing's resource
    tracker (one per interpreter, started with the first worker, ending with it)."""
    me = str(os.getpid())
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"resource_tracker" not in cmdline.read():
                    found.add(int(pid))
    return found


@pytest.mark.parametrize("workers", [0, 2])
def test_grain_workers_give_the_tf_paths_batches_bit_for_bit(
    digits_array_record_dir, tf_batches, workers
):
    before = _children()
    config = make_config(
        digits_array_record_dir,
        **AUGMENTED,
        in_memory_max_bytes=0,
        reader="grain",
        grain_workers=workers,
    )
    batches = global_batches(config, 2, STEPS, start_step=START)
    assert len(batches) == len(tf_batches) == STEPS
    for step, (a, b) in enumerate(zip(tf_batches, batches, strict=True), START):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step} {key}")
    import gc

    gc.collect()  # the datasets (and their generators) are gone: so are Grain's workers
    assert _children() <= before
