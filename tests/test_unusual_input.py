"""The last unusual inputs, each one clear line (or read as training reads it), nothing damaged.

A workdir inside (or containing) the image folder it trains on is refused up front; predict reads
16-bit PNGs as training's decoder does (scaled, not clipped); fp16 / bf16 safetensors of a sin-cos
model load, and the `posemb='learn'` override the error proposes is honoured; an unprepared TFDS
dataset without network is one line within seconds, leaving nothing in data_dir; a class folder
missing from a split, or empty, is a warning in our own format; a huge image, an unwritable or
impossible convert destination, a data_dir that is a file, a patch size that does not divide the
image and a fractional class count each get a line that names what is wrong; PIL's and TFDS's
chatter stays out of a quiet run. (`--compiler_option` without '=' is in test_bad_input's table;
Ctrl-C during preparation in test_ctrl_c_during_preparation.)
"""

import logging
import os
import socket
import warnings

import jax
import ml_collections
import numpy as np
import pytest
from helpers import TINY, random_params, tiny_recipe
from PIL import Image

from vit_jax import integrity
from vit_jax.data.builders import image_folder
from vit_jax.interop import input_convention, load, save
from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer
from vit_jax.train import checks


def _png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
    return str(path)


def _class_folders(root, counts_by_split):
    for split, counts in counts_by_split.items():
        for name, count in counts.items():
            os.makedirs(f"{root}/{split}/{name}", exist_ok=True)
            for i in range(count):
                _png(f"{root}/{split}/{name}/{i}.png", np.full((4, 4), 20 * i, np.uint8))
    return str(root)


def open_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


# --- workdir and dataset apart --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_a_workdir_inside_or_containing_the_image_folder_is_refused_before_anything(
    where, tmp_path
):
    from vit_jax.train import trainer

    folder = _class_folders(tmp_path / "photos", {"train": {"a": 2, "b": 2}})
    workdir = {
        "same": folder,
        "inside": f"{folder}/train/run",
        "containing": str(tmp_path),
    }[where]
    config = tiny_recipe()
    config.dataset, config.data_dir = folder, str(tmp_path / "tfds")
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"--workdir=.* the image folder config.dataset="):
        trainer.train_and_evaluate(config, workdir)
    assert _files(tmp_path) == before and not os.path.exists(f"{folder}/train/run")


def test_a_workdir_containing_data_dir_is_refused_and_one_beside_it_is_not(tmp_path):
    config = ml_collections.ConfigDict({"dataset": "digits", "data_dir": str(tmp_path / "d")})
    with pytest.raises(ValueError, match="contains config.data_dir"):
        checks.check_workdir_apart_from_data(str(tmp_path), config)
    checks.check_workdir_apart_from_data(str(tmp_path / "run"), config)  # beside: fine


# --- 16-bit PNGs ----------------------------------------------------------------------------------


def test_predict_reads_16_bit_pngs_as_training_decodes_them(tmp_path):
    import tensorflow as tf

    from vit_jax.data import preprocess

    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    path = _png(tmp_path / "g16.png", ramp)
    assert Image.open(path).mode.startswith("I;16")  # really a 16-bit file
    trained_on = preprocess.decode_crop(tf.constant(open_bytes(path)), 1).numpy()
    read = input_convention.read_image(path)
    np.testing.assert_array_equal(read, trained_on)
    assert read.dtype == np.uint8 and read.max() == 255 and read[0, 0, 0] == 0
    mid = _png(tmp_path / "mid.png", np.full((4, 4), 32768, np.uint16))
    assert input_convention.read_image(mid).max() == 128  # mid-grey stays mid-grey, not 255


# --- half-precision safetensors of a sin-cos model --------------------------------------------


@pytest.fixture(scope="module")
def sincos_model():
    config = ViTConfig(num_classes=3, posemb="sincos2d", posemb_covers_prefix=False, **TINY)
    return config, jax.tree.map(np.asarray, random_params(VisionTransformer(config)))


def _logits(config, params, images):
    return np.asarray(VisionTransformer(config).apply({"params": params}, images), np.float32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors_of_a_sincos_model_load_and_posemb_learn_is_honoured(
    dtype, sincos_model, tmp_path
):
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    config, params = sincos_model
    written = save.save_pretrained(params, str(tmp_path / "m.safetensors"), "timm", config)
    with safe_open(written, "np") as f:
        metadata = f.metadata()
    cast = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    half = str(tmp_path / f"m_{dtype}.safetensors")
    save_file({k: v.astype(cast) for k, v in load_file(written).items()}, half, metadata)

    images = np.random.default_rng(0).normal(size=(2, *config.image_size, 3)).astype(np.float32)
    expected = _logits(config, params, images)
    fixed = load.load_checkpoint(half)
    assert fixed.config.posemb == "sincos2d"
    as_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), fixed.params)
    # The weights are rounded to `dtype`: the logits agree to that precision.
    tolerance = 5 * float(ml_dtypes.finfo(cast).eps) * max(1.0, np.abs(expected).max())
    np.testing.assert_allclose(_logits(fixed.config, as_f32, images), expected, atol=tolerance)

    learned = load.load_checkpoint(half, posemb="learn")  # what the old error proposed
    assert learned.config.posemb == "learn"
    table = learned.params["Transformer"]["posembed_input"]["pos_embedding"]
    assert table.shape == (1, np.prod(config.grid_size), config.hidden_size)
    as_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), learned.params)
    np.testing.assert_allclose(_logits(learned.config, as_f32, images), expected, atol=tolerance)


def test_a_trained_posemb_is_still_not_taken_for_the_fixed_table(sincos_model, tmp_path):
    from vit_jax.interop.formats import layout

    config, params = sincos_model
    trained = layout.sincos_table(config) + np.float32(0.05)  # far beyond any dtype's rounding
    tree = {"Transformer": {"posembed_input": {"pos_embedding": trained.astype(np.float16)}}}
    with pytest.raises(ValueError, match="posemb='learn'"):
        layout.drop_fixed_posemb(tree, config)


# --- TFDS without network -------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connecting is refused at once


def _tfds_config(data_dir):
    return ml_collections.ConfigDict(
        {"dataset": "mnist", "data_dir": str(data_dir), "skip_corrupt_images": False}
    )


def test_an_unprepared_tfds_dataset_without_network_is_one_line_leaving_nothing(
    tmp_path, monkeypatch
):
    from vit_jax.data import sources

    monkeypatch.setattr(sources, "NETWORK_PROBES", (("127.0.0.1", _closed_port()),))
    for variable in sources._PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConnectionError) as error:
        sources.open_builder(_tfds_config(tmp_path))
    message = str(error.value)
    assert "'mnist' is not prepared" in message and "no network" in message
    assert "tfds build mnist" in message and "\n" not in message
    assert _files(tmp_path) == [] and os.listdir(tmp_path) == []


def test_a_failed_tfds_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from vit_jax.data import sources

    monkeypatch.setattr(sources, "_check_network", lambda name, where: None)
    builder_class = type(tfds.builder("mnist", data_dir=str(tmp_path)))

    def failing_download(self, *args, **kwargs):
        os.makedirs(os.path.join(self.data_dir + ".incomplete", "downloads.tmp"))
        raise OSError("connection reset")

    monkeypatch.setattr(builder_class, "download_and_prepare", failing_download)
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    with pytest.raises(RuntimeError, match="preparing it failed"):
        sources.open_builder(_tfds_config(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["kept"]


def test_tfds_download_lines_stay_off_stdout(tmp_path, capsys, monkeypatch):
    import tensorflow_datasets as tfds

    from vit_jax.data import sources

    records = []  # what reaches logging (whatever handlers an earlier test left on the loggers)
    monkeypatch.setattr(sources.logging, "info", lambda msg, *args: records.append(msg % args))
    builder = tfds.builder("mnist", data_dir=str(tmp_path))
    sources._quiet_stdout_lines(builder)
    builder._log_download_bytes()
    builder._log_download_done()
    assert capsys.readouterr().out == ""
    assert records == ["Preparing mnist.", "Prepared mnist."]  # still there, for --verbose


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    from vit_jax.data import sources

    a_file = tmp_path / "data.txt"
    a_file.write_text("not a folder")
    config = ml_collections.ConfigDict({"dataset": "digits", "data_dir": str(a_file)})
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        sources.open_builder(config)


# --- class folders ----------------------------------------------------------------------------


def test_a_class_only_in_the_eval_split_and_an_empty_class_are_warned(tmp_path, caplog):
    root = _class_folders(
        tmp_path / "f",
        {"train": {"cat": 2, "dog": 2, "emu": 0}, "test": {"cat": 1, "dog": 1, "owl": 1}},
    )
    with caplog.at_level(logging.WARNING):
        listing = image_folder.scan_folder(root)
    assert listing.class_names == ("cat", "dog", "emu", "owl")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("['emu'] hold no images in any split" in line for line in lines), lines
    assert any(
        "['owl'] have images in other splits but none in split 'train'" in line for line in lines
    ), lines


def test_our_warnings_are_plain_lines_in_a_quiet_cli(monkeypatch):
    from absl import logging as absl_logging

    from vit_jax.tools import cli

    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(handler, "formatter", handler.formatter)  # put back afterwards
    monkeypatch.setattr(handler, "filters", list(handler.filters))
    cli.quiet_logs(False, tensorflow=False)

    def record(pathname):
        return logging.LogRecord("absl", logging.WARNING, pathname, 7, "class %s", ("emu",), None)

    assert handler.format(record(image_folder.__file__)) == "WARNING: class emu"
    assert handler.format(record("/elsewhere/lib.py")) != "WARNING: class emu"  # absl's own


# --- misleading lines -----------------------------------------------------------------------------


def test_a_huge_image_is_named_and_a_large_one_reads_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    large = _png(tmp_path / "large.png", np.zeros((12, 12), np.uint8))  # 144 px: PIL warns
    huge = _png(tmp_path / "huge.png", np.zeros((16, 16), np.uint8))  # 256 > 2 * 100: refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the read
        assert input_convention.read_image(large).shape == (12, 12, 1)
    with pytest.raises(ValueError, match=r"huge.png' is too large to read: .*256 pixels"):
        input_convention.read_image(huge)


def test_convert_destinations_that_cannot_be_written_say_why(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for destination in (a_file / "model.npz", a_file / "sub" / "model.npz"):
        with pytest.raises(ValueError, match=r"notes.txt is a file, so nothing can be written"):
            save.check_destination(str(destination), "npz")
    try:  # sysfs takes no new files, not even from root (where permissions cannot be tested)
        integrity.check_writable("/sys")
    except OSError:
        with pytest.raises(ValueError, match=r"/sys/vit-test.npz: cannot write in /sys \("):
            save.check_destination("/sys/vit-test.npz", "npz")
    save.check_destination(str(tmp_path / "new" / "model.npz"), "npz")  # a new folder is fine
    assert not (tmp_path / "new").exists()


def test_a_patch_size_that_does_not_divide_the_image_names_both(tmp_path):
    import vit_jax

    with pytest.raises(ValueError) as error:
        vit_jax.create_model("ViT-B/61")
    message = str(error.value)
    assert "patch_size=(61, 61)" in message and "a patch size that divides the image" in message
    assert "16" in message.split("divides the image")[1]  # the sizes that would fit are named


@pytest.mark.parametrize("value", [2.5, -1, True, "10"])
def test_a_class_count_that_is_not_a_count_is_refused_by_name(value):
    import vit_jax

    with pytest.raises(ValueError, match=rf"num_classes={value!r}: expected an int >= 0"):
        vit_jax.create_model("ViT-Ti/16", num_classes=value)
