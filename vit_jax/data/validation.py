"""Checks on the data config and the dataset, so mistakes fail at once with a clear message.

Each error names the offending field, its value and what is allowed. They all run before any
example is read, so a bad config never costs a compilation or a partial epoch.
"""

import numbers

import tensorflow_datasets as tfds


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ValueError(f"config.{field}={value!r} is invalid: {allowed}.")


def _check_pair(pp, field: str, high: float):
    """`pp.<field>` is None or a (min, max) pair with 0 < min <= max <= high."""
    value = pp[field]
    pair = isinstance(value, tuple | list) and len(value) == 2 and all(map(_is_number, value))
    ok = value is None or (pair and 0 < value[0] <= value[1] <= high)
    _require(ok, f"pp.{field}", value, f"must be None or (min, max) with 0 < min <= max <= {high}")


def validate_config(config, process_index: int, process_count: int) -> None:
    """Raises ValueError for the first data field of `config` (defaults merged in) that is bad."""
    _require(
        _is_int(process_count) and process_count > 0, "process_count", process_count, "must be >= 1"
    )
    _require(
        _is_int(process_index) and 0 <= process_index < process_count,
        "process_index",
        process_index,
        f"must be in [0, {process_count})",
    )
    _require(
        isinstance(config.dataset, str) and config.dataset,
        "dataset",
        config.dataset,
        "must be a TFDS name or an image folder path",
    )
    for field in ("train_split", "eval_split"):
        value = config[field]
        _require(isinstance(value, str) and value, field, value, "must be a TFDS split spec")
    _require(
        _is_int(config.image_size) and config.image_size > 0,
        "image_size",
        config.image_size,
        "must be a positive int (the side of the square model input)",
    )
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        _require(_is_int(value) and value > 0, field, value, "must be a positive int")
        _require(
            value % process_count == 0,
            field,
            value,
            f"the global batch must divide by the {process_count} processes "
            f"(use a multiple of {process_count})",
        )
    _require(_is_int(config.seed), "seed", config.seed, "must be an int")
    _require(
        _is_int(config.shuffle_buffer_size) and config.shuffle_buffer_size > 0,
        "shuffle_buffer_size",
        config.shuffle_buffer_size,
        "must be a positive int",
    )
    _require(
        _is_int(config.in_memory_max_bytes) and config.in_memory_max_bytes >= 0,
        "in_memory_max_bytes",
        config.in_memory_max_bytes,
        "must be an int >= 0 (bytes; 0 = never hold the train split in memory)",
    )
    _require(
        config.reader in ("tf", "grain"),
        "reader",
        config.reader,
        "allowed 'tf' (by index in tf.data) or 'grain' (Grain worker processes)",
    )
    _require(
        _is_int(config.grain_workers) and config.grain_workers >= 0,
        "grain_workers",
        config.grain_workers,
        "must be an int >= 0 (processes reading for reader='grain'; 0 = in this process)",
    )
    pp = config.pp
    _require(pp.num_channels in (1, 3), "pp.num_channels", pp.num_channels, "must be 1 or 3")
    _check_pair(pp, "crop_area_range", 1.0)
    _require(pp.crop_aspect_range is not None, "pp.crop_aspect_range", None, "must be a pair")
    _check_pair(pp, "crop_aspect_range", float("inf"))
    _require(
        _is_int(pp.translate_pixels) and pp.translate_pixels >= 0,
        "pp.translate_pixels",
        pp.translate_pixels,
        "must be an int >= 0",
    )
    _require(
        _is_number(pp.rotate_degrees) and 0 <= pp.rotate_degrees <= 180,
        "pp.rotate_degrees",
        pp.rotate_degrees,
        "must be in [0, 180] (0 turns rotation off)",
    )
    _check_pair(pp, "scale_range", 10.0)
    _require(
        _is_number(pp.label_smoothing) and 0 <= pp.label_smoothing < 1,
        "pp.label_smoothing",
        pp.label_smoothing,
        "must be in [0, 1)",
    )
    _require(
        _is_number(pp.mixup_alpha) and pp.mixup_alpha >= 0,
        "pp.mixup_alpha",
        pp.mixup_alpha,
        "must be >= 0 (0 turns mixup off)",
    )
    _require(
        _is_int(pp.randaugment_layers) and pp.randaugment_layers >= 0,
        "pp.randaugment_layers",
        pp.randaugment_layers,
        "must be an int >= 0 (0 turns RandAugment off)",
    )
    _require(
        _is_number(pp.randaugment_magnitude) and 0 <= pp.randaugment_magnitude <= 30,
        "pp.randaugment_magnitude",
        pp.randaugment_magnitude,
        "must be in [0, 30] (10 is the paper's maximum)",
    )
    _require(
        _is_number(pp.eval_crop_fraction) and 0 < pp.eval_crop_fraction <= 1,
        "pp.eval_crop_fraction",
        pp.eval_crop_fraction,
        "must be in (0, 1]",
    )


def _split_size(builder, config, field: str) -> int:
    split = config[field]
    available = sorted(builder.info.splits)
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
            f"config.{field}={split!r} is not a split of {builder.name!r} ({e}); its splits are "
            f"{available}, and slices such as 'train[:90%]' or 'train[:1000]' work too."
        ) from None
    if num_examples == 0:
        raise ValueError(f"config.{field}={split!r} of {builder.name!r} has no examples.")
    return num_examples


def validate_dataset(builder, config) -> None:
    """Raises ValueError if the dataset is not image classification or a split is missing."""
    features = builder.info.features
    has_label = "label" in features and isinstance(features["label"], tfds.features.ClassLabel)
    if "image" not in features or not has_label:
        raise ValueError(
            f"Dataset {builder.name!r} has features {sorted(features)}; image classification "
            "needs an 'image' and a 'label' (tfds.features.ClassLabel) feature."
        )
    if not builder.info.splits:
        raise ValueError(
            f"Dataset {builder.name!r} in {builder.data_dir} has no split information: it has "
            "not been prepared (see `tfds build`)."
        )
    for field in ("train_split", "eval_split"):
        _split_size(builder, config, field)
