"""Where a dataset comes from: `config.dataset` opened as a TFDS builder, and how its splits are cut.

`open_builder` resolves the name with `dataset_kind` (a registered TFDS name wins over a same-named
folder; an image folder is turned into a builder) and prepares it on first use; `shards` gives each
process its `tfds.even_splits` share of a split; `decoders` reads only image and label, images still encoded.
`vit_jax.data.pipeline` builds the train and eval pipelines on top.
"""

import dataclasses
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import progress
from vit_jax.data.builders import image_folder_builder  # Also registers the `digits` builder.


def open_builder(config, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `config.dataset` (a TFDS name or an image folder); one not yet
    prepared is downloaded and prepared, or with `prepare=False` (a dry run) refused."""
    data_dir = config.data_dir
    if data_dir is not None and not tf.io.gfile.isdir(data_dir):
        raise FileNotFoundError(
            f"config.data_dir={data_dir!r} does not exist. Create it (datasets are prepared into "
            "it on first use), point it at a TFDS data dir, or set it to None for TFDS's default "
            "($TFDS_DATA_DIR or ~/tensorflow_datasets)."
        )
    name = config.dataset
    if dataset_kind(name) == "folder":
        return image_folder_builder(
            os.path.expanduser(name), data_dir, skip_corrupt=config.skip_corrupt_images
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset config.dataset={name!r}. Use one of: 'digits' (built in, offline); "
            "a TFDS name (see tfds.list_builders(), e.g. 'cifar10', 'imagenet2012') prepared in "
            "config.data_dir (`tfds build NAME --data_dir=DIR`, on a machine with network); or "
            "the path of an image folder laid out as <root>/<split>/<class_name>/*.jpg."
        ) from None
    if not builder.is_prepared() and not prepare:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; a dry run does not "
            f"download it (a real start does, or prepare it with `tfds build {name} "
            f"--data_dir=DIR` and set config.data_dir=DIR)"
        )
    if not builder.is_prepared():
        try:
            # TFDS's bars (downloads, examples, shuffling) only where ours would show.
            with progress.tfds_bars(progress.shows()):
                builder.download_and_prepare()
        except Exception as e:  # Re-raised with what to do about it...
            builder = tfds.builder(name, data_dir=data_dir)
            if builder.is_prepared():  # ...unless another process prepared it meanwhile.
                return builder
            raise RuntimeError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
                f"failed ({type(e).__name__}: {e}). Prepare it where there is network access with "
                f"`tfds build {name} --data_dir=DIR` (`--manual_dir` for datasets such as "
                "imagenet2012 that need a manual download), then copy DIR here and set "
                "config.data_dir=DIR."
            ) from e
    return builder


def dataset_kind(name: str) -> str:
    """'folder' (an image folder) or 'tfds' (a name for `tfds.builder`) for `config.dataset`,
    reading no data; FileNotFoundError naming a folder path that does not exist."""
    path = os.path.expanduser(name)
    # A registered TFDS name wins over a same-named folder in the working directory.
    is_tfds_name = name.split("/")[0].split(":")[0] in tfds.list_builders(
        with_community_datasets=False
    )
    if os.path.isdir(path) and (name.startswith(("/", ".", "~")) or not is_tfds_name):
        return "folder"
    if name.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"config.dataset={name!r} looks like an image folder, but "
            f"{os.path.abspath(path)!r} does not exist."
        )
    return "tfds"


def decoders(builder):
    """Read only image and label; keep images encoded so they are decoded after shuffling."""
    image_feature = builder.info.features["image"]
    skip = {"image": tfds.decode.SkipDecoding()}
    is_encoded = isinstance(image_feature, tfds.features.Image)
    return tfds.decode.PartialDecoding(
        {"image": True, "label": True}, decoders=skip if is_encoded else None
    )


@dataclasses.dataclass(frozen=True)
class Shard:
    """One process's share of a split: the TFDS split spec and its size."""

    split: object  # What `tfds.even_splits` returns; any `builder.as_dataset` split argument.
    num_examples: int


def shards(builder, split: str, count: int) -> list[Shard]:
    # Same shares as `tfds.split_for_jax_process(split, process_index=i, process_count=count)`.
    shares = tfds.even_splits(split, n=count)
    return [Shard(s, builder.info.splits[s].num_examples) for s in shares]
