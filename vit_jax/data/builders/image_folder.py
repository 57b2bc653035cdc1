"""Users' own images, `<root>/<split>/<class_name>/*.{jpg,jpeg,png}`, as a TFDS dataset.

`image_folder_builder(root, data_dir)` copies the encoded files (not re-encoded) into TFDS
TFRecords under `<data_dir>/vit_image_folder/<folder>_<fingerprint>/`, once, so that a folder
goes through exactly the pipeline any TFDS dataset does: real splits, per-process shards, class
names and counts in `info`. The fingerprint covers every file's path, size and mtime, so adding,
removing or editing an image prepares a fresh copy instead of reading a stale one.

Labels are the indices of the class folder names, sorted, over all splits together (a class that
only appears in one split keeps the same index everywhere). Images in nested folders below a class
folder belong to that class. Other file types are ignored (and counted in the log); an image file
directly inside a split folder has no class, so it is an error.

Every image is decoded once, with the same TF decoder the pipeline uses, before anything is
written. An undecodable file raises an error that names it, or, with `skip_corrupt=True`, is left
out; skipped files are logged at preparation and again at every load (from `info.metadata`).
"""

import dataclasses
import hashlib
import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax import progress
from vit_jax.data.builders.own_progress import OwnProgress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAX_FILES_NAMED = 10


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """What an image folder holds: `files[split]` lists (path relative to root, label)."""

    root: str
    class_names: tuple[str, ...]
    files: dict[str, list[tuple[str, int]]]
    num_ignored: int  # Files that are not images by extension.

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for split, files in sorted(self.files.items()):
            for relpath, _ in files:
                stat = os.stat(os.path.join(self.root, relpath))
                digest.update(f"{split}\0{relpath}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def scan_folder(root: str) -> FolderListing:
    """Lists `<root>/<split>/<class>/**/*.{jpg,jpeg,png}`; raises if the layout is wrong."""
    root = os.path.abspath(os.path.expanduser(root))
    layout = (
        f"expected <root>/<split>/<class_name>/*.{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}}"
    )
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist ({layout}).")
    splits = _subdirs(root)
    if not splits:
        raise ValueError(f"Image folder {root!r} has no split folders ({layout}).")
    for split in splits:
        if not re.fullmatch(r"[\w-]+", split):
            raise ValueError(
                f"Split folder {os.path.join(root, split)!r}: TFDS split names may only use "
                "letters, digits, '_' and '-'; rename it."
            )
    class_names = tuple(sorted({c for s in splits for c in _subdirs(os.path.join(root, s))}))
    label_of = {name: label for label, name in enumerate(class_names)}
    files, num_ignored = {}, 0
    for split in splits:
        split_dir = os.path.join(root, split)
        stray = [f for f in os.listdir(split_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if stray:
            raise ValueError(
                f"Image {os.path.join(split_dir, stray[0])!r} is not inside a class folder, so it "
                f"has no label ({layout})."
            )
        files[split] = []
        for class_name in _subdirs(split_dir):
            for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, class_name)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if not filename.lower().endswith(IMAGE_EXTENSIONS):
                        num_ignored += not filename.startswith(".")
                        continue
                    relpath = os.path.relpath(os.path.join(dirpath, filename), root)
                    files[split].append((relpath, label_of[class_name]))
        if not files[split]:
            raise ValueError(f"Split folder {split_dir!r} holds no images ({layout}).")
    _check_classes(root, class_names, files)
    return FolderListing(root, class_names, files, num_ignored)


def _check_classes(root: str, class_names: tuple[str, ...], files: dict) -> None:
    """At least two classes with images (one class trains to a meaningless 100 %); a class folder
    without any image is named in a warning (it still takes a label, so the head has its output),
    and so is a class with images in some splits only (e.g. in the eval split but not in train: a
    head output that is never trained, scored as if it were)."""
    in_split = {split: {label for _, label in split_files} for split, split_files in files.items()}
    used = set().union(*in_split.values())
    empty = [name for label, name in enumerate(class_names) if label not in used]
    if len(used) < 2:
        raise ValueError(
            f"Image folder {root!r} has {len(used)} class(es) with images "
            f"({', '.join(class_names) or 'none'}): classification needs at least 2 class folders "
            f"with images in <root>/<split>/<class_name>/."
        )
    if empty:
        logging.warning(
            "Image folder %r: class folder(s) %s hold no images in any split (each still gets a "
            "label and a head output)",
            root,
            empty,
        )
    for split, labels in sorted(in_split.items()):
        missing = [class_names[label] for label in sorted(used - labels)]
        if missing:
            logging.warning(
                "Image folder %r: class(es) %s have images in other splits but none in split "
                "%r (missing from the train split, a class is never learned; from the eval "
                "split, never scored)",
                root,
                missing,
                split,
            )


def find_undecodable(paths: list[str]) -> list[str]:
    """The files among `paths` that TF cannot decode as an image (read and decoded in parallel)."""

    def decode(path):
        # The shape is an output, so the decode cannot be optimized away.
        return path, tf.shape(tf.io.decode_image(tf.io.read_file(path), expand_animations=False))

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    decoded = set()
    with progress.bar(len(paths), "checking images", unit="image", leave=True) as bar:
        for path, _ in ds.ignore_errors().as_numpy_iterator():
            decoded.add(path.decode())
            bar.update(1)
        bar.update(len(paths) - bar.n)  # the undecodable ones were checked too
    return [p for p in paths if p not in decoded]


class VitImageFolder(OwnProgress, tfds.core.GeneratorBasedBuilder):
    """An image folder prepared into TFRecords; build it with `image_folder_builder`."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, listing: FolderListing, skip_corrupt: bool = False, **kwargs):
        self._listing = listing
        self._skip_corrupt = skip_corrupt
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"Image folder {self._listing.root}",
            features=tfds.features.FeaturesDict(
                {
                    # Shape is nominal: bytes are stored as they are on disk and the pipeline
                    # decodes them to the channels it wants.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=self._listing.class_names),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        root = self._listing.root
        paths = [
            os.path.join(root, rel) for files in self._listing.files.values() for rel, _ in files
        ]
        logging.info("Checking that the %d images under %s decode.", len(paths), root)
        bad = find_undecodable(paths)
        if bad and not self._skip_corrupt:
            named = ", ".join(repr(p) for p in bad[:_MAX_FILES_NAMED])
            more = f" and {len(bad) - _MAX_FILES_NAMED} more" if len(bad) > _MAX_FILES_NAMED else ""
            raise ValueError(
                f"{len(bad)} file(s) in image folder {root!r} are not decodable images: "
                f"{named}{more}. Fix or remove them, or set config.skip_corrupt_images=True to "
                "skip them (they are then counted in the log)."
            )
        if bad:
            logging.warning("Skipping %d undecodable image(s) under %s: %s", len(bad), root, bad)
        self.info.metadata["skipped_files"] = [os.path.relpath(p, root) for p in bad]
        skip = set(self.info.metadata["skipped_files"])
        return {
            split: self._generate_examples([(rel, y) for rel, y in files if rel not in skip], split)
            for split, files in self._listing.files.items()
        }

    def _generate_examples(self, files, split):
        # TFDS reads each file's bytes as it takes the example: the bar counts files copied.
        with progress.bar(len(files), f"image folder {split}", unit="image", leave=True) as bar:
            for relpath, label in files:
                path = os.path.join(self._listing.root, relpath)
                yield relpath, {"image": path, "label": label, "file_name": relpath}
                bar.update(1)


def image_folder_builder(
    root: str, data_dir: str | None = None, skip_corrupt: bool = False, file_format=None
) -> VitImageFolder:
    """The (prepared, on first use) TFDS builder of the image folder at `root`; `file_format`
    ('tfrecord' / 'array_record', None: TFDS's default) applies when it is prepared here."""
    listing = scan_folder(root)
    slug = re.sub(r"\W+", "_", os.path.basename(listing.root)).strip("_").lower()[:40] or "root"
    # Skip mode is part of the name: a copy prepared without some files must not be reused
    # when the user asks for errors instead.
    name = f"{slug}_{listing.fingerprint()}{'_skip' if skip_corrupt else ''}"
    config = tfds.core.BuilderConfig(name=name, description=f"Image folder {listing.root}")
    make_builder = lambda: VitImageFolder(
        listing=listing,
        skip_corrupt=skip_corrupt,
        config=config,
        data_dir=data_dir,
        file_format=file_format,
    )
    builder = make_builder()
    if listing.num_ignored:
        logging.info("Ignored %d non-image files under %s.", listing.num_ignored, listing.root)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception:
            builder = make_builder()
            if not builder.is_prepared():  # Unless another process prepared it meanwhile.
                raise
    if skipped := builder.info.metadata.get("skipped_files"):
        logging.warning(
            "Image folder %s: %d undecodable file(s) were skipped: %s",
            listing.root,
            len(skipped),
            skipped[:_MAX_FILES_NAMED],
        )
    return builder
