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
    (["--reader", "torch"], "--reader='torch' is invalid: allowed 'tf' "),
    (["--grain_workers", "-1"], "--grain_workers=-1 is invalid: must be an int >= 0 "),
    (["--in_memory_max_mib", "-1"], "--in_memory_max_mib=-1 is invalid: must be >= 0"),
    (["--rounds", "0"], "--rounds=0 is invalid: must be >= 1"),
    (["--file_format", "parquet"], "argument --file_format: invalid choice: 'parquet'"),
    (["--reader_stages"], "--reader_stages times the by-index path: it needs --file_format "),
    (
        ["--reader_stages", "--file_format", "array_record", "--host_cores", "0"],
        "--host_cores=0 is invalid: must be >= 1",
    ),
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


STAGES = [
    "read, in this process",
    "read, 1 Grain worker",
    "read, 2 Grain workers",
    "pipeline, reader='tf'",
    "pipeline, reader='grain', 1 worker",
    "pipeline, reader='grain', 2 workers",
    "pipeline, TFRecord streamed",
]


def test_reader_stages_time_every_stage_of_the_by_index_path(run_main, tmp_path):
    status, out, err, _ = run_main(
        ["--dataset", "digits", "--image_size", "8", "--batch_size", "16", "--num_batches", "2",
         "--warmup", "1", "--rounds", "1", "--file_format", "array_record",
         "--in_memory_max_mib", "0", "--reader_stages", "--host_cores", "64",
         "--data_dir", str(tmp_path / "tfds")],
        real=True,
    )  # fmt: skip
    assert status == 0, err
    header, *rows, projection = out.strip().splitlines()
    assert header.startswith("digits: 1437 train examples, image_size 8, batch 16, ")
    assert [row.split("  ")[1].strip() for row in rows] == STAGES
    rates = {name: float(row.split()[-6].replace(",", "")) for name, row in zip(STAGES, rows)}
    assert all(rate > 0 for rate in rates.values())
    # The projection is the arithmetic of the rows: 32 of 64 cores' workers at one worker's rate.
    grain = float(projection.rsplit(" ", 2)[-2].replace(",", ""))
    assert grain == pytest.approx(32 * rates["read, 1 Grain worker"], rel=1e-3)
    assert "with 32 worker(s) of 64 cores" in projection


def test_the_command_line_shows_no_traceback_and_no_library_logs():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.input_benchmark", "--dataset", "nope"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=180,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # no TensorFlow banner, absl records or traceback
    assert line.startswith(f"{PROG} --dataset='nope' is invalid")
