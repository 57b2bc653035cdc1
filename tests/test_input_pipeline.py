"""vit_jax.data.pipeline: batches, multi-process shares, eval padding, determinism, bad input."""

import collections
import itertools

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax.data import pipeline, sources


def make_config(data_dir, **fields):
    """Digits at 8 px with no augmentation: output pixels are exactly the stored pixels."""
    config = pipeline.default_data_config().to_dict()
    config.update(data_dir=data_dir, image_size=8, batch_size=64, eval_batch_size=64)
    config["pp"].update(crop_area_range=None, flip=False, num_channels=1)
    config["pp"].update(fields.pop("pp", {}))
    config.update(fields)
    return ml_collections.ConfigDict(config)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def pixels(images) -> list[bytes]:
    """[-1, 1] float images -> exact uint8 pixels, one bytes key per image (for multisets)."""
    as_uint8 = np.round(np.asarray(images) * 127.5 + 127.5).astype(np.uint8)
    return [image.tobytes() for image in as_uint8]


def raw_pixels(data_dir, split) -> list[bytes]:
    builder = tfds.builder("digits", data_dir=data_dir)
    return [
        image.tobytes()
        for image in tfds.as_numpy(builder.as_dataset(split, batch_size=-1))["image"]
    ]


def assert_one_hot(labels, num_classes):
    assert labels.dtype == np.float32 and labels.shape[-1] == num_classes
    assert set(np.unique(labels)) <= {0.0, 1.0}
    np.testing.assert_array_equal(labels.sum(-1), 1.0)


# TFDS catalogue datasets, mocked: TFDS generates random examples from each dataset's real feature
# spec (encoded PNGs for cifar10, JPEGs of random sizes for imagenet2012). Split sizes come from
# metadata files we write, as `tfds.testing.mock_data` documents.
MOCK_EXAMPLES = 24


@pytest.fixture(scope="module")
def mock_metadata_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mock_tfds")
    for name, splits in (("cifar10", ("train", "test")), ("imagenet2012", ("train", "validation"))):
        builder = tfds.builder(name, data_dir=str(data_dir))
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path, dataset_name=name, filetype_suffix="tfrecord"
        )
        split_infos = [
            tfds.core.SplitInfo(
                name=s, shard_lengths=[MOCK_EXAMPLES], num_bytes=0, filename_template=template
            )
            for s in splits
        ]
        builder.info.set_splits(tfds.core.SplitDict(split_infos))
        builder.data_path.mkdir(parents=True)
        builder.info.write_to_directory(builder.data_path)
    return str(data_dir)


@pytest.mark.parametrize(
    "name, eval_split, num_classes, process_count",
    [("cifar10", "test", 10, 1), ("imagenet2012", "validation", 1000, 2)],
)
def test_mock_tfds_dataset_batches(mock_metadata_dir, name, eval_split, num_classes, process_count):
    config = pipeline.default_data_config()
    config.update(
        dict(dataset=name, data_dir=mock_metadata_dir, eval_split=eval_split, image_size=24)
    )
    config.update(dict(batch_size=8, eval_batch_size=10, shuffle_buffer_size=16))
    if name == "imagenet2012":  # The classic central crop, on JPEGs of random sizes.
        config.pp.eval_crop_fraction = 0.875
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(MOCK_EXAMPLES, policy=policy, data_dir=mock_metadata_dir):
        data = pipeline.get_datasets(config, process_index=0, process_count=process_count)
        train = take(data.train_iter(), 4)  # More than one epoch of this process's share.
        evals = list(data.eval_iter())
    assert data.num_classes == num_classes
    assert data.num_train_examples == data.num_eval_examples == MOCK_EXAMPLES
    assert data.image_shape == (24, 24, 3)
    local = 8 // process_count
    assert data.local_batch_size == local and data.local_eval_batch_size == 10 // process_count
    for batch in train:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (local, 24, 24, 3) and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
        assert batch["label"].shape == (local, num_classes)
        assert_one_hot(batch["label"], num_classes)
    # Eval: padded and masked batches. (mock_data serves every sub-split in full, so per-process
    # shares are checked on digits below; here only the single-process count is exact.)
    share = MOCK_EXAMPLES // process_count
    assert len(evals) == data.num_eval_batches == -(-share // data.local_eval_batch_size)
    masks = np.concatenate([b["mask"] for b in evals])
    assert masks.dtype == np.float32 and set(np.unique(masks)) <= {0.0, 1.0}
    if process_count == 1:
        assert masks.sum() == MOCK_EXAMPLES
    labels = np.concatenate([b["label"] for b in evals])
    assert_one_hot(labels[masks == 1], num_classes)
    assert not labels[masks == 0].any()
    assert evals[0]["image"].shape == (data.local_eval_batch_size, 24, 24, 3)


def test_sizes_come_from_dataset_info(digits_data_dir):
    data = pipeline.get_datasets(make_config(digits_data_dir), 0, 1)
    assert (data.num_classes, data.num_train_examples, data.num_eval_examples) == (10, 1437, 360)
    assert data.class_names == tuple(str(k) for k in range(10))
    assert data.image_shape == (8, 8, 1) and data.source_image_shape == (8, 8, 1)


def global_batches(config, process_count, steps, start_step=0):
    """Each step's global batch: the processes' rows concatenated in process order."""
    parts = [
        take(pipeline.get_datasets(config, i, process_count).train_iter(start_step), steps)
        for i in range(process_count)
    ]
    return [
        {key: np.concatenate([p[step][key] for p in parts]) for key in parts[0][step]}
        for step in range(steps)
    ]


def test_one_epoch_is_each_example_once_across_processes(digits_data_dir):
    """Two simulated processes: the first 1437 rows of the global stream are the whole split."""
    config = make_config(digits_data_dir)
    batches = global_batches(config, 2, -(-1437 // 64))
    images = np.concatenate([b["image"] for b in batches])[:1437]
    assert collections.Counter(pixels(images)) == collections.Counter(
        raw_pixels(digits_data_dir, "train")
    )


def test_global_batches_do_not_depend_on_the_process_count(digits_data_dir):
    """Order, augmentation and mixup (neighbours across processes) as if on one process."""
    config = make_config(digits_data_dir, **AUGMENTED)
    single = global_batches(config, 1, 3, start_step=11)  # crosses the first epoch boundary
    for process_count in (2, 4):
        for step, (a, b) in enumerate(zip(single, global_batches(config, process_count, 3, 11))):
            for key in ("image", "label"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{process_count} {step}")


@pytest.mark.parametrize("process_count, eval_batch_size", [(1, 1000), (2, 14), (3, 33), (4, 100)])
def test_eval_counts_every_example_exactly_once(digits_data_dir, process_count, eval_batch_size):
    # 359 examples: uneven shares across 2, 3 and 4 processes, and a partial last batch.
    config = make_config(
        digits_data_dir, eval_split="test[:359]", batch_size=60, eval_batch_size=eval_batch_size
    )
    seen, batch_counts = collections.Counter(), set()
    for process_index in range(process_count):
        data = pipeline.get_datasets(config, process_index, process_count)
        batches = list(data.eval_iter())
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == data.local_eval_batch_size
            real = batch["mask"] == 1
            assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
            assert not batch["image"][~real].any(), "padding must be zeros"
            seen.update(pixels(batch["image"][real]))
    assert len(batch_counts) == 1, "every process must run the same number of eval steps"
    assert seen == collections.Counter(raw_pixels(digits_data_dir, "test[:359]"))
    assert sum(seen.values()) == 359


def test_eval_iter_repeats_identically(digits_data_dir):
    data = pipeline.get_datasets(make_config(digits_data_dir, image_size=12), 0, 1)
    first, second = list(data.eval_iter()), list(data.eval_iter())  # Second pass: from cache.
    assert len(first) == len(second) == 6
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


AUGMENTED = dict(
    train_split="train[:400]",  # Small epochs keep the multi-epoch tests fast.
    image_size=16,
    batch_size=32,
    shuffle_buffer_size=90,  # < 400 / 2: several blocks per process and a real shuffle buffer.
    pp=dict(
        crop_area_range=(0.3, 1.0),
        flip=True,
        translate_pixels=2,
        randaugment_layers=2,
        randaugment_magnitude=15,
        mixup_alpha=0.4,
        label_smoothing=0.1,
        num_channels=3,
    ),
)


def test_same_seed_same_batches_other_seed_other_batches(digits_data_dir):
    def first_batches(seed):
        config = make_config(digits_data_dir, seed=seed, **AUGMENTED)
        return take(pipeline.get_datasets(config, 0, 1).train_iter(), 2)

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_restart_at_step_equals_uninterrupted_stream(digits_data_dir, process_index, process_count):
    config = make_config(digits_data_dir, **AUGMENTED)
    data = pipeline.get_datasets(config, process_index, process_count)
    assert data.num_train_examples == 400
    steps_per_epoch = 400 / process_count / data.local_batch_size
    stream = take(data.train_iter(), int(2 * steps_per_epoch) + 2)
    # A batch straddling the first epoch boundary, and one inside the third epoch.
    for step in (int(steps_per_epoch), int(2 * steps_per_epoch) + 1):
        restarted = next(data.train_iter(start_step=step))
        np.testing.assert_array_equal(restarted["image"], stream[step]["image"], err_msg=str(step))
        np.testing.assert_array_equal(restarted["label"], stream[step]["label"], err_msg=str(step))
    # Epochs differ in order and augmentation (not the same batches over again).
    assert not np.array_equal(stream[0]["image"], stream[int(steps_per_epoch) + 1]["image"])


def test_augmented_batches_are_well_formed(digits_data_dir):
    config = make_config(digits_data_dir, **AUGMENTED)
    batch = next(pipeline.get_datasets(config, 0, 1).train_iter())
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    # Grayscale digits became 3 identical channels.
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    labels = batch["label"]
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-5)
    assert labels.min() >= 0.1 / 10 - 1e-6  # Smoothing puts at least eps/K on every class.
    assert not np.isin(labels, [0.01, 0.91]).all()  # Mixup mixed the smoothed labels.


def test_label_smoothing_values(digits_data_dir):
    config = make_config(digits_data_dir, pp=dict(label_smoothing=0.2))
    labels = next(pipeline.get_datasets(config, 0, 1).train_iter())["label"]
    np.testing.assert_allclose(np.sort(np.unique(labels)), [0.02, 0.82], rtol=1e-6)
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    eval_labels = next(pipeline.get_datasets(config, 0, 1).eval_iter())["label"]
    assert_one_hot(eval_labels, 10)  # Eval labels are never smoothed.


def test_mixup_is_a_convex_mix_of_neighbours(digits_data_dir):
    plain = next(pipeline.get_datasets(make_config(digits_data_dir), 0, 1).train_iter())
    config = make_config(digits_data_dir, pp=dict(mixup_alpha=1.0))
    mixed = next(pipeline.get_datasets(config, 0, 1).train_iter())
    # Same order and augmentation; mixup only combines x with roll(x, 1).
    x, y = plain["image"], plain["label"]
    other = np.roll(x, 1, axis=0) - x
    lam = 1.0 - np.sum((mixed["image"] - x) * other) / np.sum(other * other)
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(mixed["image"], lam * x + (1 - lam) * np.roll(x, 1, 0), atol=1e-5)
    np.testing.assert_allclose(mixed["label"], lam * y + (1 - lam) * np.roll(y, 1, 0), atol=1e-5)


# Bad input: a clear error, before any data is read.


@pytest.fixture
def no_data_access(monkeypatch):
    """Config errors must be raised before the dataset is even opened."""

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was opened before the config was validated")

    monkeypatch.setattr(sources, "open_builder", fail)


@pytest.mark.parametrize(
    "fields, process_count, message",
    [
        (dict(image_size=0), 1, r"config.image_size=0 is invalid: must be a positive int"),
        (dict(image_size=-3), 1, r"config.image_size=-3 is invalid"),
        (dict(image_size=32.0), 1, r"config.image_size=32.0 is invalid"),
        (dict(batch_size=10), 3, r"config.batch_size=10 .* divide by the 3 processes"),
        (dict(eval_batch_size=7), 2, r"config.eval_batch_size=7 .* multiple of 2"),
        (dict(batch_size=0), 1, r"config.batch_size=0 is invalid: must be a positive int"),
        (dict(pp=dict(num_channels=2)), 1, r"config.pp.num_channels=2 is invalid: must be 1 or 3"),
        (dict(pp=dict(crop_area_range=(0.5, 0.1))), 1, r"crop_area_range=\(0.5, 0.1\)"),
        (dict(pp=dict(eval_crop_fraction=0)), 1, r"eval_crop_fraction=0 is invalid"),
        (dict(pp=dict(randaugment_magnitude=31)), 1, r"randaugment_magnitude=31 .* \[0, 30\]"),
        (dict(in_memory_max_bytes=-1), 1, r"config.in_memory_max_bytes=-1 is invalid: must be an"),
        (dict(in_memory_max_bytes=1.5), 1, r"config.in_memory_max_bytes=1.5 is invalid: .* >= 0"),
        (dict(reader="torch"), 1, r"config.reader='torch' is invalid: allowed 'tf' .* or 'grain'"),
        (dict(grain_workers=-1), 1, r"config.grain_workers=-1 is invalid: must be an int >= 0"),
        (
            dict(pp=dict(label_smothing=0.1)),
            1,
            r"Unknown config.pp field\(s\) \['label_smothing'\]",
        ),
    ],
)
def test_bad_config_values(no_data_access, fields, process_count, message):
    config = make_config("/unused", **fields)
    with pytest.raises(ValueError, match=message):
        pipeline.get_datasets(config, 0, process_count)


@pytest.fixture
def no_pipeline(monkeypatch):
    """Dataset errors must be raised before any pipeline is built."""

    def fail(*args, **kwargs):
        raise AssertionError("a pipeline was built before the dataset was validated")

    monkeypatch.setattr(pipeline, "Data", fail)


def test_unknown_dataset_name(no_pipeline, digits_data_dir):
    config = make_config(digits_data_dir, dataset="digitz")
    with pytest.raises(ValueError, match="Unknown dataset config.dataset='digitz'") as error:
        pipeline.get_datasets(config, 0, 1)
    # The message says how to name or prepare one.
    for hint in ("'digits'", "tfds build", "tfds.list_builders()", "<root>/<split>/<class_name>"):
        assert hint in str(error.value)


def test_missing_image_folder(no_pipeline, tmp_path):
    config = make_config(None, dataset=str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="no_such_folder.* does not exist"):
        pipeline.get_datasets(config, 0, 1)


def test_missing_data_dir(no_pipeline, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"config.data_dir='{missing}' does not exist"):
        pipeline.get_datasets(make_config(missing), 0, 1)


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_nonexistent_split(no_pipeline, digits_data_dir, field):
    config = make_config(digits_data_dir, **{field: "validation"})
    with pytest.raises(ValueError, match=f"config.{field}='validation' is not a split") as error:
        pipeline.get_datasets(config, 0, 1)
    assert "['test', 'train']" in str(error.value)  # What is available.


def test_tfds_name_wins_over_same_named_folder(digits_data_dir, tmp_path, monkeypatch):
    (tmp_path / "digits" / "train" / "a").mkdir(parents=True)  # Not an image folder at all.
    monkeypatch.chdir(tmp_path)
    data = pipeline.get_datasets(make_config(digits_data_dir), 0, 1)
    assert data.builder.name == "digits" and data.num_train_examples == 1437
    with pytest.raises(ValueError, match="start_step=-1 is invalid"):
        data.train_iter(start_step=-1)


def test_unprepared_dataset_that_cannot_download(no_pipeline, tmp_path, monkeypatch):
    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    monkeypatch.setattr(sources, "_check_network", lambda name, where: None)  # a host answers
    config = make_config(str(tmp_path), dataset="cifar10")
    with pytest.raises(RuntimeError, match="'cifar10' is not prepared in .*no network") as error:
        pipeline.get_datasets(config, 0, 1)
    assert "tfds build cifar10 --data_dir=DIR" in str(error.value)


def test_array_record_data_source_gives_the_same_global_batches(digits_data_dir, tmp_path):
    """A split too large for memory is read by index from ArrayRecord: the same order as in memory."""
    config = make_config(digits_data_dir, **AUGMENTED)
    in_memory = global_batches(config, 1, 2, start_step=12)
    array_record_dir = str(tmp_path / "array_record")
    tfds.builder(
        "digits", data_dir=array_record_dir, file_format="array_record"
    ).download_and_prepare()
    config = make_config(array_record_dir, **AUGMENTED, in_memory_max_bytes=0)
    assert pipeline.get_datasets(config, 0, 2).order == "global"
    from_source = global_batches(config, 2, 2, start_step=12)
    for a, b in zip(in_memory, from_source, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_large_tfrecord_split_streams_per_process_and_says_so(digits_data_dir, caplog):
    data = pipeline.get_datasets(make_config(digits_data_dir, in_memory_max_bytes=0), 1, 2)
    assert data.order == "per_process"
    assert "not ArrayRecord (no random access)" in caplog.text
    assert next(data.train_iter())["image"].shape == (32, 8, 8, 1)
