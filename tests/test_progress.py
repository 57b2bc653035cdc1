"""Progress bars for long work: dataset preparation and conversion (training and evaluation use the
same `vit_jax.progress.bar`).

On a terminal each piece of work draws one bar that reaches its total and is left showing it (never
"ETA ?"), TFDS's own bars are not drawn beside ours; off a terminal nothing of a bar is written. A
terminal is faked by a stderr whose `isatty()` says yes: the seam tqdm itself uses.
"""

import io
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import FIXTURES, FakeTerminal, assert_finished, fake_terminal, final_lines
from PIL import Image
from tensorflow_datasets.core.utils import tqdm_utils

from vit_jax import progress
from vit_jax.data.builders import image_folder
from vit_jax.tools import convert as convert_cli


@pytest.fixture
def tfds_bars_on():
    """TFDS's bars enabled, as in a plain Python session (the CLIs and conftest turn them off)."""
    with progress.tfds_bars(True):
        yield


def test_a_finished_bar_is_left_with_its_total_and_a_stopped_one_is_cleared():
    with fake_terminal() as terminal:
        with progress.bar(40, "work", unit="item", leave=True) as bar:
            for _ in range(40):
                bar.update(1)
        with progress.bar(40, "stopped", unit="item", leave=True) as bar:
            bar.update(3)
    lines = final_lines(terminal.getvalue())
    assert_finished(lines, "work", 40)
    assert not any(line.startswith("stopped") for line in lines), lines


def test_digits_preparation_draws_one_bar_per_split_and_not_tfds_bars(tfds_bars_on, tmp_path):
    with fake_terminal() as terminal:
        tfds.builder("digits", data_dir=str(tmp_path)).download_and_prepare()
    lines = final_lines(terminal.getvalue())
    assert_finished(lines, "digits train", 1437)
    assert_finished(lines, "digits test", 360)
    assert "Generating" not in terminal.getvalue() and "Shuffling" not in terminal.getvalue()
    assert tqdm_utils._active  # TFDS's own setting is as it was


def _folder(root, counts):
    for split, classes in counts.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / split / name / f"{i}.png")


def test_image_folder_preparation_bars_count_checked_and_copied_images(tfds_bars_on, tmp_path):
    _folder(tmp_path / "pets", {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    with fake_terminal() as terminal:
        image_folder.image_folder_builder(str(tmp_path / "pets"), str(tmp_path / "tfds"))
    lines = final_lines(terminal.getvalue())
    assert_finished(lines, "checking images", 7)
    assert_finished(lines, "image folder train", 5)
    assert_finished(lines, "image folder test", 2)
    assert "Generating" not in terminal.getvalue()


def test_other_tfds_datasets_show_tfds_bars_only_on_a_terminal(tmp_path, monkeypatch):
    from vit_jax.data import pipeline, sources

    seen = []

    def prepare(self, *args, **kwargs):  # records TFDS's bar setting; prepares nothing
        seen.append(tqdm_utils._active)
        raise ConnectionError("offline")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", prepare)
    monkeypatch.setattr(sources, "_check_network", lambda name, where: None)  # a host answers
    config = pipeline.default_data_config()
    config.dataset, config.data_dir = "cifar10", str(tmp_path)
    with progress.tfds_bars(False):  # as the CLIs leave it
        for stderr in (io.StringIO(), FakeTerminal()):
            with mock.patch.object(sys, "stderr", stderr), pytest.raises(RuntimeError):
                sources.open_builder(config)
        assert not tqdm_utils._active
    assert seen == [False, True]


def test_preparation_off_a_terminal_writes_no_bar(capsys, tfds_bars_on, tmp_path):
    tfds.builder("digits", data_dir=str(tmp_path)).download_and_prepare()
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" not in err and "%|" not in err and "digits train" not in err


def test_conversion_bar_reaches_its_stages(tmp_path):
    source = str(FIXTURES / "vit_jax_gap" / "params.npz")
    with fake_terminal() as terminal:
        assert convert_cli.main([source, str(tmp_path / "out.npz"), "--to", "npz"]) == 0
    assert_finished(final_lines(terminal.getvalue()), "convert to npz", 3)


def test_conversion_off_a_terminal_prints_only_its_report(capsys, tmp_path):
    source = str(FIXTURES / "vit_jax_gap" / "params.npz")
    assert convert_cli.main([source, str(tmp_path / "out.npz"), "--to", "npz"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and "\r" not in out + err and "%|" not in out + err


def test_copy_counts_every_byte():
    data = np.arange(3 << 20, dtype=np.uint8).tobytes()  # three full chunks and no remainder
    target = io.BytesIO()
    with fake_terminal() as terminal:
        progress.copy(io.BytesIO(data), target, len(data), "download x")
    assert target.getvalue() == data
    assert_finished(final_lines(terminal.getvalue()), "download x", "3.00M")
