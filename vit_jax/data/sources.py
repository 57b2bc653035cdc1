"""Where a dataset comes from: `config.dataset` opened as a TFDS builder, and how its splits are cut.

`open_builder` resolves the name with `dataset_kind` (a registered TFDS name wins over a same-named
folder; an image folder is turned into a builder) and prepares it on first use; `shards` gives each
process its `tfds.even_splits` share of a split; `decoders` reads only image and label, images still encoded.
`vit_jax.data.pipeline` builds the train and eval pipelines on top.
"""

import contextlib
import dataclasses
import os
import socket

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax import progress
from vit_jax.data.builders import image_folder_builder  # Also registers the `digits` builder.
from vit_jax.data.builders.own_progress import OwnProgress


def open_builder(config, prepare: bool = True) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder for `config.dataset` (a TFDS name or an image folder); one not yet
    prepared is downloaded and prepared, or with `prepare=False` (a dry run) refused."""
    data_dir = config.data_dir
    if data_dir is not None and tf.io.gfile.exists(data_dir) and not tf.io.gfile.isdir(data_dir):
        raise NotADirectoryError(
            f"config.data_dir={data_dir!r} is a file, not a folder: point it at a TFDS data dir "
            "(a folder; datasets are prepared into it on first use), or set it to None for TFDS's "
            "default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."
        )
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
        ours = isinstance(builder, OwnProgress)  # offline, with bars of their own (digits)
        if not ours:
            _check_network(name, builder.data_dir)
        root = data_dir or os.path.expanduser(
            os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        )
        before = _directories(root)
        try:
            # TFDS's bars (downloads, examples, shuffling) only where ours would show.
            with progress.tfds_bars(progress.shows()):
                if not ours:
                    _quiet_stdout_lines(builder)
                    progress.log(f"Preparing TFDS dataset {name!r} into {builder.data_dir}")
                builder.download_and_prepare()
        except Exception as e:  # Re-raised with what to do about it...
            builder = tfds.builder(name, data_dir=data_dir)
            if builder.is_prepared():  # ...unless another process prepared it meanwhile.
                return builder
            _remove_new_empty_directories(root, before)
            raise RuntimeError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
                f"failed ({type(e).__name__}: {e}). Prepare it where there is network access with "
                f"`tfds build {name} --data_dir=DIR` (`--manual_dir` for datasets such as "
                "imagenet2012 that need a manual download), then copy DIR here and set "
                "config.data_dir=DIR."
            ) from e
    return builder


# Hosts a TFDS download needs one of (its GCS mirror; datasets' own hosts are often GitHub or
# TensorFlow's): none reachable means no network, said in seconds instead of minutes of retries.
NETWORK_PROBES = (("storage.googleapis.com", 443), ("github.com", 443), ("www.tensorflow.org", 443))
_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def _check_network(name: str, where: str) -> None:
    """ConnectionError (one line) unless some download host answers; a proxy is left to TFDS."""
    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return
    errors = []
    probes = NETWORK_PROBES
    if os.environ.get("VIT_JAX_NETWORK_PROBES"):  # "host:port,..." (the tests: a closed local port)
        probes = [
            (host, int(port))
            for host, _, port in (
                p.rpartition(":") for p in os.environ["VIT_JAX_NETWORK_PROBES"].split(",")
            )
        ]
    for host, port in probes:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
            return
        except OSError as e:
            errors.append(f"{host}: {e.strerror or e}")
    raise ConnectionError(
        f"TFDS dataset {name!r} is not prepared in {where} and there is no network to download it "
        f"({'; '.join(errors)}). Prepare it where there is network with `tfds build {name} "
        "--data_dir=DIR`, copy DIR here and set config.data_dir=DIR"
    )


def _directories(root: str | None) -> set[str]:
    if root is None or not os.path.isdir(root):
        return set()
    return {dirpath for dirpath, _, _ in os.walk(root)}


def _remove_new_empty_directories(root: str | None, before: set[str]) -> None:
    """What a failed TFDS download leaves (empty `.tmp` / `.incomplete` folders), removed; a
    folder that was there before, or holds a file, stays."""
    for path in sorted(_directories(root) - before, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only succeeds on an empty folder


def _quiet_stdout_lines(builder) -> None:
    """TFDS prints "Downloading and preparing dataset ..." and "Dataset ... downloaded and
    prepared" on stdout, outside logging; they become log records (shown with --verbose), as our
    own builders do (`builders.own_progress`); the run says what it prepares in its own line."""
    builder._log_download_bytes = lambda: logging.info("Preparing %s.", builder.name)
    builder._log_download_done = lambda: logging.info("Prepared %s.", builder.name)


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
