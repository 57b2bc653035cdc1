"""Input pipelines: any TFDS image-classification dataset or image folder -> numpy batches.

Usage (what the trainer does)::

    data = input_pipeline.get_datasets(config)      # process_index/count: jax's by default
    data.num_classes, data.num_train_examples, data.num_eval_examples  # from the dataset's info
    data.image_shape                                 # (image_size, image_size, num_channels)
    data.local_batch_size, data.local_eval_batch_size  # this process's slice of the batches
    for batch in data.train_iter(start_step=step):   # infinite
        batch['image']  # float32 (local_batch_size, H, W, C) in [-1, 1]
        batch['label']  # float32 (local_batch_size, num_classes), one-hot (smoothed, mixed up)
    for batch in data.eval_iter():                   # one pass over the eval split
        batch['image'], batch['label']  # as above (labels never smoothed or mixed)
        batch['mask']   # float32 (local_eval_batch_size,): 1 real example, 0 padding
    data.num_eval_batches                            # eval_iter's length, same on all processes
    data.class_names, data.source_image_shape, data.builder  # more from the dataset

Batches are per-process numpy; `vit_jax.sharding` turns them into global `jax.Array`s. Any missing
data field of `config` takes its `default_data_config()` value; other fields are ignored, but an
unknown `pp.*` field is an error (a typo would otherwise silently do nothing).

Opening the dataset (TFDS name or image folder, prepared on first use) and cutting its splits into
per-process shares: `vit_jax.data.sources`; the per-example ops: `vit_jax.data.preprocess`.

Config fields: `vit_jax/data/defaults.py` lists each with its default and meaning
(`default_data_config()` gives them all; `get_datasets` validates them first). `data_dir`: unprepared
TFDS datasets are downloaded and prepared there; `digits` and image folders are prepared there
offline on first use (processes racing to prepare the same dir are fine; on a pod, preparing once
beforehand saves every host the work). Batch sizes must divide by the process count.

Training order: one global stream of examples, the same whatever the topology. Step `s`'s global
batch is the stream positions s*batch_size .. (s+1)*batch_size - 1, and process `i` of `n` yields
only its rows i*b .. (i+1)*b - 1 of it (b = batch_size / n). Augmentation is keyed on (seed, the
example's stream position) and mixup on (seed, step), with each example mixed with the one before
it in the *global* batch, so the concatenation of the processes' batches at a step is the same on
1 x 4, 2 x 2 or 4 x 1 (processes x devices) and `train_iter(start_step)` restarts exactly, on any
process count. Which example sits at a position depends on how the split can be read:

- random access (`Data.order == 'global'`): splits of up to `config.in_memory_max_bytes` (256 MiB by
  default: digits, CIFAR, small image folders) are read once, undecoded, into memory, and larger
  ones stored as ArrayRecord
  (`tfds build --file_format=array_record`) are read by index through TFDS `data_source`;
  position p is example
  `index_shuffle(p mod N)` of a permutation keyed on (seed, epoch p // N): one global shuffle per
  epoch. `shuffle_buffer_size` is not used.
  How the ArrayRecord one is read: `config.reader='tf'` calls `data_source` inside
  `tf.numpy_function` (one Python thread); `'grain'` has `config.grain_workers` Grain processes
  read each step's rows (same positions, same permutation: `vit_jax.data.grain_reader`), and
  tf.data decodes, augments and batches them as on the tf path, so the batches are identical.
- streaming (`Data.order == 'per_process'`, larger TFRecord splits; logged): each process reads its own
  `tfds.even_splits` share of the split, undecoded; epoch `e` of that share is a seeded interleave
  of contiguous blocks followed by a seeded shuffle buffer, both keyed on (seed, e). Reproducible
  and restartable for a fixed process count, but which examples a process sees depends on the
  process count (and mixup pairs neighbours within a process's rows), so resuming on another
  process count continues with another order (the trainer warns).

Evaluation: each process reads its `tfds.even_splits` share of the eval split in order, pads the
last batch with zero images whose mask is 0, and then adds fully-masked batches until it has
`num_eval_batches` (the same on every process), so multi-host eval steps stay in lockstep and an
accuracy of sum(correct * mask) / sum(mask) counts every example exactly once.
"""

import contextlib
import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax import progress
from vit_jax.data import preprocess, sources
from vit_jax.data.defaults import DATA_DEFAULTS, PREPROCESSING_DEFAULTS
from vit_jax.data.validation import validate_config, validate_dataset

# The input pipeline is CPU work: never let TF take accelerator memory from JAX. (RuntimeError:
# TF's devices were already initialized elsewhere; then there is nothing to change.)
with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")

_UNKNOWN_EXAMPLE_BYTES = 4096  # Size assumed per example where the dataset info gives none.
_MAX_BLOCKS = 64  # Contiguous blocks interleaved per epoch: mixes files like shuffle_files.
_EVAL_CACHE_BYTES = 512 * 2**20  # Keep preprocessed eval batches in memory up to this size.
# Stream tags, so order, augmentation and mixup draw independent randomness from one seed.
_ORDER, _AUGMENT, _MIXUP = 1, 2, 3


def default_data_config() -> ml_collections.ConfigDict:
    """All the data fields `get_datasets` reads, at their defaults (`vit_jax/data/defaults.py`)."""
    return ml_collections.ConfigDict(dict(DATA_DEFAULTS, pp=dict(PREPROCESSING_DEFAULTS)))


def get_datasets(
    config,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    prepare: bool = True,
):
    """Validates `config`, opens the dataset (downloading and preparing it if needed and `prepare`;
    else an unprepared one is an error), returns its `Data`."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    config = _with_defaults(config)
    validate_config(config, process_index, process_count)
    builder = sources.open_builder(config, prepare=prepare)
    validate_dataset(builder, config)
    return Data(config, builder, process_index, process_count)


def _with_defaults(config) -> ml_collections.ConfigDict:
    """`config`'s data fields over `default_data_config()`, so older configs keep working."""
    # Plain dicts: ConfigDict.update would refuse e.g. a float over the int default.
    merged = default_data_config().to_dict()
    pp = dict(config.get("pp") or {})
    if unknown := sorted(set(pp) - set(merged["pp"])):
        raise ValueError(f"Unknown config.pp field(s) {unknown}; known: {sorted(merged['pp'])}.")
    merged.update({k: v for k, v in config.items() if k in merged and k != "pp"})
    merged["pp"].update(pp)
    return ml_collections.ConfigDict(merged)


class Data:
    """A dataset opened for one process: sizes from its info, and train/eval iterators."""

    def __init__(self, config, builder, process_index: int, process_count: int):
        self.config = config
        self.builder = builder
        self.process_index, self.process_count = process_index, process_count
        info = builder.info
        self.class_names = tuple(info.features["label"].names)
        self.num_classes = info.features["label"].num_classes
        self.num_train_examples = info.splits[config.train_split].num_examples
        self.num_eval_examples = info.splits[config.eval_split].num_examples
        self.image_shape = (config.image_size, config.image_size, config.pp.num_channels)
        self.source_image_shape = tuple(info.features["image"].shape)
        self.local_batch_size = config.batch_size // process_count
        self.local_eval_batch_size = config.eval_batch_size // process_count

        self._train = sources.shards(builder, config.train_split, process_count)[process_index]
        if self._train.num_examples == 0:
            raise ValueError(
                f"config.train_split={config.train_split!r} has {self.num_train_examples} "
                f"examples, too few to give each of the {process_count} processes one."
            )
        eval_shards = sources.shards(builder, config.eval_split, process_count)
        self._eval = eval_shards[process_index]
        biggest = max(s.num_examples for s in eval_shards)
        # Same count on every process, so multi-host eval steps stay in lockstep.
        self.num_eval_batches = math.ceil(biggest / self.local_eval_batch_size)
        self._seed = tf.constant([config.seed, 0], tf.int64)
        self._decoders = sources.decoders(builder)
        split_bytes = info.splits[config.train_split].num_bytes
        split_bytes = split_bytes or self.num_train_examples * _UNKNOWN_EXAMPLE_BYTES
        self._train_examples = self._train_source = None
        if split_bytes <= config.in_memory_max_bytes:
            self.order = "global"
            self._train_examples = self._read_in_memory(config.train_split)
        elif info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            self.order = "global"  # TFDS data_source: any example by index, from the files
            self._train_source = self._open_data_source(config.train_split)
            if config.reader == "grain" and process_index == 0:
                progress.log(
                    f"Train split {config.train_split} ({split_bytes:,} bytes): read by index "
                    f"in {config.grain_workers} Grain worker process(es) per process"
                )
        else:
            self.order = "per_process"
            self._train_blocks = self._make_train_blocks()
            logging.warning(
                "Train split %s (%d bytes) is too large to hold in memory and is not ArrayRecord "
                "(no random access): each process streams its own share, so the data order "
                "depends on the process count (resuming on another count continues with another "
                "order). `tfds build --file_format=array_record` gives a global order.",
                config.train_split,
                split_bytes,
            )
        self._eval_dataset = None  # Built once, so its in-memory cache lasts across passes.
        logging.info(
            "Data %s: %d classes, train %s (%d examples, %s order), eval %s (%d, %d here); "
            "process %d/%d, local batch %d, local eval batch %d, %d eval batches.",
            config.dataset,
            self.num_classes,
            config.train_split,
            self.num_train_examples,
            self.order,
            config.eval_split,
            self.num_eval_examples,
            self._eval.num_examples,
            process_index,
            process_count,
            self.local_batch_size,
            self.local_eval_batch_size,
            self.num_eval_batches,
        )

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Infinite iterator of this process's train batches, from step `start_step` on."""
        if start_step < 0:
            raise ValueError(f"start_step={start_step} is invalid: must be >= 0.")
        return self.train_dataset(start_step).as_numpy_iterator()

    def in_memory_train(self) -> dict[str, tf.Tensor] | None:
        """The whole train split, undecoded, indexed by example, when held in memory (else None)."""
        return self._train_examples

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this process's eval share: `num_eval_batches` padded, masked batches."""
        return self.eval_dataset().as_numpy_iterator()

    # The tf.data pipelines behind the iterators.

    def _read(self, split):
        if self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            # TFDS's as_dataset cannot read ArrayRecord: every example by index, in stored order.
            source = self._open_data_source(split)
            return tf.data.Dataset.range(len(source[0])).map(
                _graph_fn(lambda i: _read_by_index(source, i))
            )
        # No autocache: blocks are read whole each epoch, and a cache abandoned mid-epoch warns.
        read_config = tfds.ReadConfig(skip_prefetch=True, try_autocache=False)
        ds = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders=self._decoders, read_config=read_config
        )
        return ds.map(_graph_fn(lambda ex: {"image": ex["image"], "label": ex["label"]}))

    def _read_in_memory(self, split) -> dict[str, tf.Tensor]:
        """The whole split, undecoded, as tensors indexed by example: what random access reads."""
        parts = list(self._read(split).batch(4096).as_numpy_iterator())
        return {k: tf.constant(np.concatenate([p[k] for p in parts])) for k in parts[0]}

    def _open_data_source(self, split):
        feature = self.builder.info.features["image"]
        skip = isinstance(feature, tfds.features.Image)  # keep encoded: decoded after indexing
        source = self.builder.as_data_source(
            split, decoders={"image": tfds.decode.SkipDecoding()} if skip else None
        )
        image_spec = (tf.string, ()) if skip else (tf.uint8, feature.shape)
        return source, image_spec

    def _fetch(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Example `index` of the train split, from memory or from the data source."""
        if self._train_examples is not None:
            return {k: tf.gather(v, index) for k, v in self._train_examples.items()}
        return _read_by_index(self._train_source, index)

    def _make_train_blocks(self) -> list[tuple[tf.data.Dataset, int]]:
        """This process's train share cut into contiguous blocks, read in stored order."""
        n, buffer = self._train.num_examples, self.config.shuffle_buffer_size
        num_blocks = int(np.clip(n // buffer, 1, _MAX_BLOCKS))
        blocks = tfds.even_splits(self._train.split, n=num_blocks) if num_blocks > 1 else [None]
        return [
            (
                self._read(b or self._train.split),
                self.builder.info.splits[b].num_examples if b else n,
            )
            for b in blocks
        ]

    def _train_epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        """Epoch `epoch` of this process's share, undecoded, in its seeded order."""
        seed = preprocess.fold_in(self._seed, _ORDER, epoch)
        datasets, sizes = zip(*self._train_blocks, strict=True)
        if len(datasets) == 1:
            ds = datasets[0]
        else:  # Every position draws a block at random, without replacement over the epoch.
            choices = tf.repeat(tf.range(len(sizes), dtype=tf.int64), sizes)
            choices = tf.random.experimental.stateless_shuffle(choices, seed)
            ds = tf.data.Dataset.choose_from_datasets(
                list(datasets), tf.data.Dataset.from_tensor_slices(choices)
            )
        buffer = min(self.config.shuffle_buffer_size, self._train.num_examples)
        shuffle_seed = tf.random.stateless_uniform(
            [], preprocess.fold_in(seed, 1), minval=None, maxval=None, dtype=tf.int64
        )
        return ds.shuffle(buffer, seed=shuffle_seed)

    def _global_index(self, position: tf.Tensor) -> tf.Tensor:
        """This process's stream position -> index in the global stream of train examples."""
        b = self.local_batch_size
        step, row = position // b, position % b
        return step * self.config.batch_size + self.process_index * b + row

    def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
        """The tf.data pipeline behind `train_iter` (e.g. for benchmarks)."""
        if self.order == "global":
            return self._global_train_dataset(start_step)
        return self._per_process_train_dataset(start_step)

    def _example_at(self, position: tf.Tensor) -> dict[str, tf.Tensor]:
        """The (undecoded) example at a global stream position: a fresh permutation per epoch."""
        n = self.num_train_examples
        epoch, offset = position // n, position % n
        seed = preprocess.fold_in(self._seed, _ORDER, epoch)
        return self._fetch(tf.random.experimental.index_shuffle(offset, seed, n - 1))

    def _global_train_dataset(self, start_step: int) -> tf.data.Dataset:
        pp = self.config.pp
        batch, b = self.config.batch_size, self.local_batch_size
        # With mixup, one more row: the example before our first one in the global batch, which
        # the first one is mixed with (on another process, or the batch's last row wrapped round).
        extra = 1 if pp.mixup_alpha > 0 else 0
        rows = tf.range(
            self.process_index * b - extra, (self.process_index + 1) * b, dtype=tf.int64
        )
        rows = rows % batch
        augment = preprocess.make_train_fn(pp, self.config.image_size, self.num_classes)

        def _augment_seed(position):
            return preprocess.fold_in(self._seed, _AUGMENT, position)

        def example(position):
            return augment(self._example_at(position), _augment_seed(position))

        ds = tf.data.Dataset.counter(start_step).map(_graph_fn(lambda step: step * batch + rows))
        if self._train_source is not None and self.config.reader == "grain":
            # Grain's workers read the same positions' examples; tf.data decodes and augments.
            ds = tf.data.Dataset.zip((ds.unbatch(), self._grain_examples(start_step, rows)))
            ds = ds.map(
                _graph_fn(lambda position, ex: augment(ex, _augment_seed(position))),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        else:
            ds = ds.unbatch().map(_graph_fn(example), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(b + extra, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
        if extra:

            def mix(step, rows_plus_one):
                seed = preprocess.fold_in(self._seed, _MIXUP, step)
                mixed = preprocess.mixup(rows_plus_one, seed, pp.mixup_alpha)
                return {k: v[1:] for k, v in mixed.items()}  # row k was mixed with row k - 1

            ds = tf.data.Dataset.zip((tf.data.Dataset.counter(start_step), ds)).map(_graph_fn(mix))
        return _finish(ds)

    def step_reader(self, rows):
        """A `grain_reader.StepReader` of this ArrayRecord train split: step -> the undecoded
        examples at global batch positions `rows` of that step (the tf path's order)."""
        from tensorflow_datasets.core.data_sources import base as data_sources

        from vit_jax.data import grain_reader

        if self._train_source is None:
            raise ValueError(f"train split {self.config.train_split!r} is not read by index")
        # The epoch seeds are [u, epoch] (stateless_fold_in): the workers need only u.
        order_draw = int(preprocess.fold_in(self._seed, _ORDER, 0).numpy()[0])
        return grain_reader.StepReader(
            data_sources.file_instructions(self.builder.info, self.config.train_split),
            self.builder.info.features,
            self._train_source[0].decoders,
            np.asarray(rows),
            self.config.batch_size,
            self.num_train_examples,
            order_draw,
        )

    def _grain_examples(self, start_step: int, rows: tf.Tensor) -> tf.data.Dataset:
        """This process's undecoded train examples from step `start_step` on, one per row,
        read by `config.grain_workers` Grain processes (`vit_jax.data.grain_reader`)."""
        from vit_jax.data import grain_reader

        return grain_reader.examples_dataset(
            self.step_reader(rows.numpy()),
            start_step,
            self.config.grain_workers,
            self._train_source[1],
        )

    def _per_process_train_dataset(self, start_step: int) -> tf.data.Dataset:
        pp = self.config.pp
        first = start_step * self.local_batch_size  # Position of the first example we yield.
        start_epoch, offset = divmod(first, self._train.num_examples)
        examples = (
            tf.data.Dataset.counter(start_epoch).flat_map(_graph_fn(self._train_epoch)).skip(offset)
        )
        augment = preprocess.make_train_fn(pp, self.config.image_size, self.num_classes)

        def preprocess_example(position, example):
            seed = preprocess.fold_in(self._seed, _AUGMENT, self._global_index(position))
            return augment(example, seed)

        ds = tf.data.Dataset.zip((tf.data.Dataset.counter(first), examples))
        ds = ds.map(_graph_fn(preprocess_example), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(
            self.local_batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE
        )
        if pp.mixup_alpha > 0:

            def mix(step, batch):
                seed = preprocess.fold_in(self._seed, _MIXUP, step)  # one lam per global batch
                return preprocess.mixup(batch, seed, pp.mixup_alpha)

            ds = tf.data.Dataset.zip((tf.data.Dataset.counter(start_step), ds)).map(_graph_fn(mix))
        return _finish(ds)

    def eval_dataset(self) -> tf.data.Dataset:
        """The tf.data pipeline behind `eval_iter`."""
        if self._eval_dataset is None:
            self._eval_dataset = self._make_eval_dataset()
        return self._eval_dataset

    def _make_eval_dataset(self) -> tf.data.Dataset:
        fn = preprocess.make_eval_fn(self.config.pp, self.config.image_size, self.num_classes)
        ds = self._read(self._eval.split).map(_graph_fn(fn), num_parallel_calls=tf.data.AUTOTUNE)
        padding = {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
        ds = ds.take(self.num_eval_batches * self.local_eval_batch_size)
        ds = ds.batch(self.local_eval_batch_size, num_parallel_calls=tf.data.AUTOTUNE)
        example_bytes = 4 * (math.prod(self.image_shape) + self.num_classes + 1)
        if self.num_eval_batches * self.local_eval_batch_size * example_bytes <= _EVAL_CACHE_BYTES:
            ds = ds.cache()
        return _finish(ds)


def _read_by_index(opened_source, index: tf.Tensor) -> dict[str, tf.Tensor]:
    """Example `index` of a data source opened by `Data._open_data_source` (image, label)."""
    source, (image_dtype, image_shape) = opened_source

    def read(i):
        example = source[int(i)]
        return np.asarray(example["image"]), np.int64(example["label"])

    image, label = tf.numpy_function(read, [index], [image_dtype, tf.int64], stateful=False)
    image.set_shape(image_shape)
    label.set_shape(())
    return {"image": image, "label": label}


def _graph_fn(fn):
    # Our tf.data functions use explicit tf.cond / tf.switch_case, so AutoGraph's source
    # conversion buys nothing and costs seconds per pipeline (RandAugment's 14 ops).
    return tf.autograph.experimental.do_not_convert(fn)


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True  # Parallel maps still yield in order: batches are reproducible.
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
