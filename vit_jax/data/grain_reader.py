"""`config.reader='grain'`: a large ArrayRecord train split read in Grain worker processes.

The tf path (`reader='tf'`) reads each example inside `tf.numpy_function`, under the GIL: one
Python thread per process, ~50-60 µs a read, so ~17k examples/s at most whatever the cores. Here
`grain_workers` processes each read whole steps: step `s`'s rows of this process (the same
positions the tf path reads), mapped to example indices by the same permutation, fetched with
one `__getitems__` from the ArrayRecord files and parsed by TFDS's numpy parser. The workers
import neither TensorFlow nor JAX (~0.5 s to start), so the ceiling is workers x the per-core
read rate. What comes back is the undecoded example (encoded bytes, label) per row: decoding and
augmentation stay in tf.data (`pipeline.py`), so the batches are bit-identical to the tf path's.

The permutation is `tf.random.experimental.index_shuffle`'s (TF's random_index_shuffle.cc: a
4-round Simon cipher with cycle walking), re-implemented in numpy here, bit for bit (tested
against TF). Its key for epoch `e` is (498247692, u, e): TF pads the [2] seed with that constant,
and the pipeline's epoch seed `fold_in(fold_in(seed, _ORDER), e)` is [u, e], u one draw fixed
by the run's seed (`stateless_fold_in(s, d)` is `[uniform(s), d]`), which the pipeline computes
once in TF and hands over.
"""

from __future__ import annotations

import math

import numpy as np

_TF_SEED_PAD = 498247692  # tf.random.experimental.index_shuffle prepends this to a [2] seed
_MIN_BLOCK_BITS = 16  # random_index_shuffle.cc's kMinBlockSize
_ROUNDS = 4  # the rounds tf.random.experimental.index_shuffle asks for
_EVER = 2**62  # "infinite" length of the step stream (Grain's MapDataset needs one)
# Splits up to this many examples get each epoch's whole permutation computed once (8 bytes an
# example): cycle walking costs ~2**16 / N rounds per read when N < 2**16, once per epoch instead.
_WHOLE_EPOCH_MAX = 2**22


def index_shuffle(index, key: tuple[int, int, int], max_index: int) -> np.ndarray:
    """`random_index_shuffle(index, key, max_index, rounds=4)` of TF, vectorized: the position of
    each `index` (0..max_index) in the permutation that the uint32 `key` triple picks."""
    index = np.asarray(index, np.uint64)
    if max_index == 0:
        return np.zeros_like(index)
    bits = math.ceil(math.log2(float(max_index)))  # as std::ceil(std::log2(max_index))
    bits = min(max(bits + bits % 2, _MIN_BLOCK_BITS), 64)
    w = bits // 2
    mask = (1 << w) - 1

    def rotr(x: int, r: int) -> int:
        return ((x >> r) | (x << (w - r))) & mask

    round_keys = [k & mask for k in key]  # std::bitset<W>(key[i]): the low W bits
    c, z = 0xFFFFFFFC & mask, 0x7369F885192C0EF5 & mask
    for i in range(3, _ROUNDS):
        round_keys.append(
            c
            ^ (z & 1)
            ^ round_keys[i - 3]
            ^ rotr(round_keys[i - 1], 3)
            ^ rotr(round_keys[i - 1], 4)
        )
        z >>= 1
    w64, mask64 = np.uint64(w), np.uint64(mask)
    keys64 = [np.uint64(k) for k in round_keys]

    def rotl(x, r):
        return ((x << np.uint64(r)) | (x >> np.uint64(w - r))) & mask64

    def simon_f(x):
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    def encrypt(value):
        left, right = (value >> w64) & mask64, value & mask64
        for i in range(0, _ROUNDS, 2):
            left ^= simon_f(right) ^ keys64[i]
            right ^= simon_f(left) ^ keys64[i + 1]
        return (left << w64) | right

    out = encrypt(index)
    todo = out > np.uint64(max_index)
    while todo.any():  # cycle walking: re-encrypt until inside [0, max_index]
        out[todo] = encrypt(out[todo])
        todo = out > np.uint64(max_index)
    return out


def epoch_key(order_draw: int, epoch: int) -> tuple[int, int, int]:
    """The uint32 key triple TF's op gets for epoch `epoch` (the module docstring says why)."""
    return (_TF_SEED_PAD, int(order_draw) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF)


def global_indices(positions, num_examples: int, order_draw: int, epochs_seen=None) -> np.ndarray:
    """Global stream positions -> example indices: a fresh permutation per epoch, as the tf path.
    `epochs_seen`: a dict that keeps the last two epochs' whole permutations (small splits)."""
    positions = np.asarray(positions, np.int64)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty(len(positions), np.int64)
    for epoch in np.unique(epochs):  # a batch spans at most two epochs
        here, epoch = epochs == epoch, int(epoch)
        key = epoch_key(order_draw, epoch)
        if epochs_seen is None or num_examples > _WHOLE_EPOCH_MAX:
            indices[here] = index_shuffle(offsets[here], key, num_examples - 1).astype(np.int64)
            continue
        if epoch not in epochs_seen:
            for old in [e for e in epochs_seen if e < epoch - 1]:
                del epochs_seen[old]
            whole = index_shuffle(np.arange(num_examples), key, num_examples - 1)
            epochs_seen[epoch] = whole.astype(np.int64)
        indices[here] = epochs_seen[epoch][offsets[here]]
    return indices


class StepReader:
    """Step -> this process's undecoded rows of it: {'image' (bytes packed in 'blob' with
    'lengths', or stacked uint8 arrays), 'label'}. Picklable: the files open in the worker."""

    def __init__(
        self, file_instructions, features, decoders, rows, batch_size, num_examples, order_draw
    ):
        self.file_instructions = list(file_instructions)
        self.features, self.decoders = features, decoders
        self.rows = np.asarray(rows, np.int64)
        self.batch_size, self.num_examples = int(batch_size), int(num_examples)
        self.order_draw = int(order_draw)
        self._source, self._epochs = None, {}

    def __getstate__(self):  # what a worker gets: no open files, no permutations
        return self.__dict__ | {"_source": None, "_epochs": {}}

    def _open(self):
        if self._source is None:
            from array_record.python import array_record_data_source

            self._source = array_record_data_source.ArrayRecordDataSource(self.file_instructions)
        return self._source

    def __call__(self, step) -> dict[str, np.ndarray]:
        positions = int(step) * self.batch_size + self.rows
        indices = global_indices(positions, self.num_examples, self.order_draw, self._epochs)
        records = self._open().__getitems__([int(i) for i in indices])
        examples = [
            self.features.deserialize_example_np(r, decoders=self.decoders) for r in records
        ]
        labels = np.array([e["label"] for e in examples], np.int64)
        images = [e["image"] for e in examples]
        if isinstance(images[0], bytes):
            lengths = np.array([len(x) for x in images], np.int64)
            blob = np.frombuffer(b"".join(images), np.uint8)
            return {"blob": blob, "lengths": lengths, "label": labels}
        return {"image": np.stack(images), "label": labels}


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """In each worker: end it once its parent is gone. A SIGKILLed (preempted) train.py runs
    no clean-up, and Grain's workers would otherwise live on, holding its stdout open."""
    import os
    import threading
    import time

    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:  # re-parented (to init or a subreaper) once it dies
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def step_stream(reader: StepReader, start_step: int, workers: int, buffer_steps: int = 2):
    """Grain's iterator of `reader(step)` for step = start_step, start_step + 1, ... in order,
    computed by `workers` processes (0: in this process)."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # outside an absl app (tests, notebooks): Grain reads its
        flags.FLAGS.mark_as_parsed()  # flags when starting workers; unparsed = their defaults
    ds = grain.MapDataset.range(start_step, _EVER).map(reader)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=buffer_steps))
    if workers > 0:
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=buffer_steps
        )
        ds = ds.mp_prefetch(options, worker_init_fn=_exit_with_parent)
    return iter(ds)


def examples_dataset(reader: StepReader, start_step: int, workers: int, image_spec):
    """A tf.data.Dataset of {'image', 'label'}, one per row of steps start_step, start_step + 1,
    ...: `reader`'s output from `workers` Grain processes (ended when the dataset's iterator is).
    `image_spec`: the stored image's (tf dtype, shape)."""
    import tensorflow as tf

    def steps():
        stream = step_stream(reader, start_step, workers)
        try:
            for element in stream:
                yield unpack(element)
        finally:
            getattr(stream, "close", lambda: None)()  # ends the worker processes

    image_dtype, image_shape = image_spec
    rows_per_step = len(reader.rows)
    ds = tf.data.Dataset.from_generator(
        steps,
        output_signature=(
            tf.TensorSpec((rows_per_step, *image_shape), image_dtype),
            tf.TensorSpec((rows_per_step,), tf.int64),
        ),
    )
    to_example = tf.autograph.experimental.do_not_convert(
        lambda image, label: {"image": image, "label": label}
    )
    return ds.unbatch().map(to_example)


def unpack(element: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A step's element -> (images: object array of bytes or uint8 array, labels)."""
    if "blob" in element:
        blob, ends = element["blob"].tobytes(), np.cumsum(element["lengths"])
        starts = ends - element["lengths"]
        images = np.array([blob[a:b] for a, b in zip(starts, ends, strict=True)], dtype=object)
        return images, element["label"]
    return element["image"], element["label"]
