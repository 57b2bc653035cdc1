"""Image folders `<root>/<split>/<class>/*.{jpg,jpeg,png}` through the same pipeline as TFDS: labels
from the class folders, grayscale and RGB alike, corrupt files named (or skipped and counted), a
changed folder prepared again, and a layout that is not one (a stray file, an empty split, fewer
than two classes with images) refused by name."""

import io
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_jax.data import pipeline
from vit_jax.data.builders import image_folder

DARK, LIGHT = 40, 210  # Pixel values of the two classes, so labels can be checked from pixels.


def write_image(path, value, grayscale=False, size=(12, 10)):
    """A flat image of `value`; JPEG or PNG by extension, grayscale or RGB."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = size if grayscale else (*size, 3)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def make_folder(root):
    """train: 3 dark (JPEG, RGB) + 2 light (PNG, grayscale); test: 1 dark + 2 light."""
    for split, counts in (("train", (3, 2)), ("test", (1, 2))):
        for i in range(counts[0]):
            write_image(f"{root}/{split}/dark/{i}.jpg", DARK)
        for i in range(counts[1]):
            write_image(f"{root}/{split}/light/sub/{i}.PNG", LIGHT, grayscale=True)  # Nested.
    with open(f"{root}/train/dark/README.txt", "w") as f:  # Not an image: ignored.
        f.write("notes")
    return str(root)


def folder_config(root, data_dir, **fields):
    config = pipeline.default_data_config().to_dict()
    config.update(dataset=root, data_dir=str(data_dir), image_size=8, batch_size=4)
    config.update(eval_batch_size=4, **fields)
    config["pp"].update(crop_area_range=None, flip=False)
    return ml_collections.ConfigDict(config)


def brightness_labels(batch):
    """1 for light images, 0 for dark ones, from the pixels alone."""
    return (batch["image"].mean(axis=(1, 2, 3)) > 0).astype(int)


def test_folder_loads_with_labels_from_class_folders(tmp_path):
    root = make_folder(tmp_path / "pets")
    data = pipeline.get_datasets(folder_config(root, tmp_path), 0, 1)
    assert data.class_names == ("dark", "light") and data.num_classes == 2
    assert (data.num_train_examples, data.num_eval_examples) == (5, 3)
    assert data.source_image_shape == (None, None, 3)

    train = next(data.train_iter())
    assert train["image"].shape == (4, 8, 8, 3)  # Grayscale PNGs became 3 channels.
    np.testing.assert_array_equal(train["label"].argmax(-1), brightness_labels(train))

    (batch,) = list(data.eval_iter())
    real = batch["mask"] == 1
    assert real.sum() == 3
    np.testing.assert_array_equal(batch["label"][real].argmax(-1), brightness_labels(batch)[real])
    # JPEG is lossy on flat images only by rounding; PNG is exact.
    expected = (np.array([DARK, LIGHT, LIGHT]) - 127.5) / 127.5
    np.testing.assert_allclose(
        np.sort(batch["image"][real].mean(axis=(1, 2, 3))), expected, atol=2 / 127.5
    )


def add_corrupt_files(root):
    with open(f"{root}/train/dark/broken.jpg", "w") as f:
        f.write("this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="jpeg"
    )
    with open(f"{root}/test/light/truncated.png", "wb") as f:  # Wrong extension, cut short.
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_corrupt_files_raise_an_error_naming_them(tmp_path):
    root = make_folder(tmp_path / "pets")
    add_corrupt_files(root)
    os.makedirs(tmp_path / "tfds_dir")
    with pytest.raises(ValueError, match="2 file.* not decodable images") as error:
        pipeline.get_datasets(folder_config(root, tmp_path / "tfds_dir"), 0, 1)
    assert "train/dark/broken.jpg" in str(error.value)
    assert "test/light/truncated.png" in str(error.value)
    assert "skip_corrupt_images=True" in str(error.value)  # How to go on anyway.
    prepared = [f for _, _, files in os.walk(tmp_path / "tfds_dir") for f in files]
    assert "dataset_info.json" not in prepared  # Nothing half-prepared is left to be reused.


def test_skip_mode_skips_and_counts_corrupt_files(tmp_path, caplog):
    root = make_folder(tmp_path / "pets")
    add_corrupt_files(root)
    config = folder_config(root, tmp_path, skip_corrupt_images=True)
    for _ in range(2):  # Preparing, then loading the prepared copy: both report the skips.
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = pipeline.get_datasets(config, 0, 1)
        assert "2 undecodable file(s) were skipped" in caplog.text
    assert (data.num_train_examples, data.num_eval_examples) == (5, 3)
    skipped = sorted(data.builder.info.metadata["skipped_files"])
    assert skipped == ["test/light/truncated.png", "train/dark/broken.jpg"]
    batch = next(data.train_iter())
    np.testing.assert_array_equal(batch["label"].argmax(-1), brightness_labels(batch))


def test_changed_folder_is_prepared_again(tmp_path):
    root = make_folder(tmp_path / "pets")
    assert pipeline.get_datasets(folder_config(root, tmp_path), 0, 1).num_train_examples == 5
    write_image(f"{root}/train/light/new.jpeg", LIGHT)
    assert pipeline.get_datasets(folder_config(root, tmp_path), 0, 1).num_train_examples == 6


def test_layout_errors(tmp_path):
    root = make_folder(tmp_path / "pets")
    write_image(f"{root}/train/stray.jpg", DARK)
    with pytest.raises(ValueError, match=r"stray.jpg' is not inside a class folder"):
        image_folder.scan_folder(root)
    os.remove(f"{root}/train/stray.jpg")
    os.makedirs(f"{root}/val/dark")
    with pytest.raises(ValueError, match=r"val' holds no images"):
        image_folder.scan_folder(root)
    with pytest.raises(ValueError, match="has no split folders"):
        image_folder.scan_folder(str(tmp_path / "pets" / "train" / "light" / "sub"))


def class_folders(root, counts: dict[str, int]):
    """train and test splits, each with `counts[name]` small PNGs in class folder `name`."""
    for split in ("train", "test"):
        for name, count in counts.items():
            os.makedirs(f"{root}/{split}/{name}")
            for i in range(count):
                write_image(f"{root}/{split}/{name}/{i}.png", i, size=(4, 4))


def test_an_image_folder_needs_two_classes_with_images(tmp_path, caplog):
    class_folders(tmp_path / "one", {"cat": 2})
    with pytest.raises(ValueError, match="1 class"):
        image_folder.scan_folder(str(tmp_path / "one"))
    class_folders(tmp_path / "empty", {"cat": 2, "dog": 2, "emu": 0})
    listing = image_folder.scan_folder(str(tmp_path / "empty"))
    assert listing.class_names == ("cat", "dog", "emu")
    assert "emu" in caplog.text
