"""`python -m vit_jax.tools.input_benchmark`: bad flags are one FATAL line before any image is read."""

import subprocess
import sys

import pytest
from helpers import REPO, subprocess_env

from vit_jax.data import pipeline
from vit_jax.tools import cli, input_benchmark

PROG = "FATAL python -m vit_jax.tools.input_benchmark:"


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(args) → (status, stdout, stderr, calls), running main in this process; `calls`
    lists the work that started (a dataset opened, JPEGs written): empty for a refused start."""
    monkeypatch.setattr(cli, "quiet_logs", lambda *a, **k: None)  # no global log changes here
    monkeypatch.setattr(cli, "plain_warnings", lambda: None)
    calls = []

    def refused(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran")

        return fail

    def run(args, *, real=False):
        if not real:
            monkeypatch.setattr(pipeline, "get_datasets", refused("get_datasets"))
            monkeypatch.setattr(input_benchmark, "make_jpeg_folder", refused("make_jpeg_folder"))
        capsys.readouterr()
        try:
            status = input_benchmark.main(args)
        except SystemExit as e:
            status = e.code
        out, err = capsys.readouterr()
        return status, out, err, calls

    return run


# (args, the FATAL line after the program's name)
BAD = [
    (["--dataset", "nope"], "--dataset='nope' is invalid: allowed jpeg_folder (synthetic JPEGs), "),
    (["--dataset", "./no/such/folder"], "--dataset='./no/such/folder' is invalid: no such image "),
    (["--batch_size", "0"], "--batch_size=0 is invalid: must be a positive int."),
    (["--image_size", "-3"], "--image_size=-3 is invalid: must be a positive int "),
    (["--mixup_alpha", "-1"], "--mixup_alpha=-1.0 is invalid: must be >= 0 "),
    (["--randaugment_layers", "-2"], "--randaugment_layers=-2 is invalid: must be an int >= 0 "),
    (["--num_batches", "0"], "--num_batches=0 is invalid: must be >= 1"),
    (["--warmup", "-1"], "--warmup=-1 is invalid: must be >= 0"),
    (["--dataset", "jpeg_folder", "--num_images", "1"], "--num_images=1 is invalid: must be >= 2"),
    (["--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_flag_is_one_usage_line_naming_it_before_any_work(run_main, args, message):
    status, out, err, calls = run_main(args)
    assert status == 2 and out == "" and calls == []
    (line,) = err.splitlines()
    assert line.startswith(f"{PROG} {message}"), line
    assert line.endswith("(--help for usage)")


def test_a_tiny_run_prints_both_speeds(run_main, tmp_path):
    status, out, err, calls = run_main(
        ["--dataset", "jpeg_folder", "--num_images", "4", "--image_size", "16", "--batch_size",
         "2", "--num_batches", "2", "--warmup", "1", "--data_dir", str(tmp_path)],
        real=True,
    )  # fmt: skip
    assert status == 0, err
    assert out.startswith("jpeg_folder: image_size 16, batch 2, ") and "images/s" in out


def test_the_command_line_shows_no_traceback_and_no_library_logs():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.input_benchmark", "--dataset", "nope"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=180,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # no TensorFlow banner, absl records or traceback
    assert line.startswith(f"{PROG} --dataset='nope' is invalid")
