"""The model throughput benchmark reports consistent figures (never asserts a speed)."""

import json
import subprocess
import sys

import pytest
from helpers import TINY

from vit_jax import benchmark


@pytest.fixture(scope="module")
def results():
    return {
        mode: benchmark.benchmark(
            None, mode=mode, batch_size=4, steps=2, repeats=2, peak_tflops=1.0, **TINY
        )
        for mode in ("train", "inference")
    }


def test_reports_throughput_flops_and_mfu(results):
    for result in results.values():
        assert result["images_per_s"] == pytest.approx(4 / result["median_step_s"])
        assert result["gflops_per_image"] > 0
        assert 0 < result["mfu"] < 1


def test_a_train_step_costs_more_than_a_forward_pass(results):
    # Backward ≈ 2× forward, plus the optimizer: a train step is 2-5× the FLOPs of inference.
    ratio = results["train"]["gflops_per_image"] / results["inference"]["gflops_per_image"]
    assert 2 < ratio < 5


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode='eval'"):
        benchmark.benchmark(None, mode="eval", **TINY)


@pytest.mark.slow
def test_command_line_prints_one_json_line_per_mode():
    out = subprocess.run(
        [sys.executable, "-m", "vit_jax.benchmark", "--variant=Ti/16", "--image_size=32",
         "--batch_size=2", "--steps=1", "--repeats=1", "--modes=inference"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()  # fmt: skip
    (line,) = out
    assert json.loads(line)["variant"] == "Ti/16"
