"""Export → predict: a digits checkpoint gives the same top-1 through every export format.

A short training run on the real digits pipeline writes an Orbax checkpoint (a sin-cos, class-token,
grayscale model, so the exports must carry the image size, the fixed position embeddings and the input
convention); `python -m vit_jax.tools.convert` writes it as npz, timm and HF; `python -m vit_jax.tools.predict`
on the 360 test digits (PNG files) must give the same top-1 for every one of them as the Orbax
checkpoint itself. Agreement between formats is what is tested, not accuracy.
"""

import numpy as np
import pytest
from PIL import Image

from configs import common
from vit_jax.tools import convert as convert_cli
from vit_jax.tools import predict
from vit_jax.train import trainer

pytestmark = pytest.mark.slow


def parse_top1(text):
    """`path` lines followed by `  1. prob%  name` lines → {path: name}."""
    top1, current = {}, None
    for line in text.splitlines():
        if not line.startswith("  "):
            current = line
        elif line.startswith("  1. "):
            top1[current] = line.split()[-1]
    return top1


def run_predict(capsys, checkpoint, images):
    assert (
        predict.main(["--checkpoint", checkpoint, "--top_k", "1", "--batch_size", "360", *images])
        == 0
    )
    out, err = capsys.readouterr()
    return parse_top1(out), err


@pytest.fixture(scope="module")
def digits_run(digits_data_dir, tmp_path_factory):
    import tensorflow_datasets as tfds

    config = common.get_config()
    config.model = common.model_fields(
        None, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=(4, 4),
        pool="token", posemb="sincos2d", posemb_covers_prefix=False,
    )  # fmt: skip
    config.update(dict(dataset="digits", data_dir=digits_data_dir, image_size=16, batch_size=64))
    config.update(dict(eval_batch_size=360, total_steps=60, log_every_steps=30))
    config.update(dict(checkpoint_every_steps=0, shuffle_buffer_size=2000))
    config.optim.learning_rate = 3e-3
    config.schedule.warmup_steps = 5
    config.pp.crop_area_range = None
    config.pp.flip = False
    config.pp.num_channels = 1
    workdir = tmp_path_factory.mktemp("digits_run")
    trainer.train_and_evaluate(config, str(workdir))
    images_dir = tmp_path_factory.mktemp("test_digits")
    paths = []
    test = tfds.load("digits", split="test", data_dir=digits_data_dir)
    for i, example in enumerate(tfds.as_numpy(test)):
        path = images_dir / f"{i:03d}_label{example['label']}.png"
        Image.fromarray(example["image"][..., 0]).save(path)
        paths.append(str(path))
    assert len(paths) == 360
    return str(workdir), paths


def test_exports_predict_the_same_top1_as_the_orbax_checkpoint(digits_run, tmp_path, capsys):
    workdir, images = digits_run
    expected, _ = run_predict(capsys, workdir, images)
    assert len(expected) == 360
    # Not a constant predictor: agreement must mean something. Labels are in the file names.
    assert len(set(expected.values())) >= 5
    correct = sum(f"label{name}." in path for path, name in expected.items())
    assert correct > 36 * 3  # well above chance (36 of 360)
    destinations = {"npz": "d.npz", "timm": "d.safetensors", "hf": "d_hf"}
    for fmt, name in destinations.items():
        convert_cli.main([workdir, str(tmp_path / name), "--to", fmt])
        out = capsys.readouterr().out
        assert "white on black" in out  # the input convention went along
        got, err = run_predict(capsys, str(tmp_path / name), images)
        assert "guessed" not in err, err  # nothing had to be guessed
        disagree = [p for p in images if got[p] != expected[p]]
        assert not disagree, f"{fmt}: {len(disagree)} of 360 digits differ, e.g. {disagree[:3]}"


def test_dark_on_light_digits_are_inverted_for_a_white_on_black_model(digits_run, tmp_path, capsys):
    workdir, images = digits_run
    inverted = []
    for path in images[:36]:
        pixels = 255 - np.asarray(Image.open(path))
        inverted.append(str(tmp_path / path.rsplit("/", 1)[-1]))
        Image.fromarray(pixels).save(inverted[-1])
    expected, _ = run_predict(capsys, workdir, images[:36])
    got, err = run_predict(capsys, workdir, inverted)
    assert err.count("inverted (the model expects white_on_black)") == 36
    assert [got[p] for p in inverted] == [expected[p] for p in images[:36]]
