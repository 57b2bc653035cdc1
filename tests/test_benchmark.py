"""The model throughput benchmark reports consistent figures (never asserts a speed)."""

import importlib.util
import json
import subprocess
import sys

import pytest
from helpers import REPO, TINY, subprocess_env

from vit_jax.model import vit
from vit_jax.tools import benchmark


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


def test_compiler_options_are_typed_and_checked_against_xla_before_any_model():
    from vit_jax.tools.bench import jax_side

    assert jax_side.parse_compiler_options(
        ["xla_cpu_enable_fast_math=false", "xla_cpu_experimental_ynn_fusion_type="]
    ) == {"xla_cpu_enable_fast_math": False, "xla_cpu_experimental_ynn_fusion_type": ""}
    assert jax_side.parse_compiler_options([]) == {}
    with pytest.raises(ValueError, match="'fast_math' is invalid: expected NAME=VALUE"):
        jax_side.parse_compiler_options(["fast_math"])
    with pytest.raises(ValueError, match="xla_no_such_option"):
        jax_side.parse_compiler_options(["xla_no_such_option=1"])


def test_compiler_options_reach_our_sides_compilation():
    from vit_jax.tools.bench import jax_side

    # An option XLA rejects fails the build: the options are handed to this compilation.
    with pytest.raises(Exception, match="xla_no_such_option"):
        jax_side.build(
            vit.get_config(None, **TINY), "inference", 2,
            compiler_options={"xla_no_such_option": 1},
        )  # fmt: skip


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode='eval'"):
        benchmark.benchmark(None, mode="eval", **TINY)


@pytest.mark.slow
def test_command_line_prints_a_json_report_and_writes_it(tmp_path):
    out = tmp_path / "b.json"
    stdout = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.benchmark", "--variant=Ti/16", "--image_size=32",
         "--batch_size=2", "--steps=1", "--repeats=1", "--modes=inference", f"--json_out={out}"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    report = json.loads(stdout)
    assert report == json.loads(out.read_text())
    assert report["variant"] == "Ti/16"
    assert [r["mode"] for r in report["results"]] == ["inference"]


@pytest.mark.parametrize(
    "variant, gflops", [("B/16", 35.1), ("L/16", 123.1), ("Ti/16", 2.5), ("S/16", 9.2)]
)
def test_analytic_flops_of_known_variants(variant, gflops):
    from vit_jax.tools.bench import flops

    assert flops.forward_flops(vit.get_config(variant)) / 1e9 == pytest.approx(gflops, rel=0.01)


def test_xla_cost_analysis_agrees_with_the_analytic_count(results):
    for row in results.values():
        assert row["xla_gflops_per_image"] == pytest.approx(
            row["analytic_gflops_per_image"], rel=0.15
        )


def test_comparison_side_is_skipped_cleanly_without_torch_and_json_is_complete():
    report = benchmark.compare(
        vit.get_config(None, **TINY),
        modes=("inference",),
        batch_size=2,
        steps=1,
        repeats=1,
        libraries=("timm",),
    )
    json.dumps(report)
    assert [r["library"] for r in report["results"]][0] == "vit_jax"
    if importlib.util.find_spec("torch") is None:
        assert report["errors"][0]["skipped"].startswith("torch")
    assert report["results"][0]["peak_memory_mb"] > 0


@pytest.mark.slow
def test_gpu_script_runs_a_tiny_plan_on_cpu_and_records_every_run(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--tiny", "--out", str(out), "--steps=1",
         "--repeats=1", "--attention", "xla"],
        cwd=REPO, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    # The two XLA-attention comparison rows, then the two probes (a batch, an XLA option).
    assert len(report["runs"]) == 4 and all("report" in r for r in report["runs"])
    assert report["runs"][0]["report"]["results"][0]["library"] == "vit_jax"
    probe = report["runs"][-1]
    assert probe["report"]["compiler_options"] == probe["spec"]["compiler_options"] != {}
    assert report["best_mfu"] == {}  # MFU needs a known peak: a bf16 GPU, not CPU float32
    # The deployed StableHLO file ran here (on the GPU machine: on CUDA) and gave our logits.
    assert report["stablehlo"]["platform"] == "cpu", report["stablehlo"]
    assert report["stablehlo"]["max_abs_diff"] < 1e-4


@pytest.mark.slow  # a short real training run and a bare loop of its step
def test_trainer_mode_times_the_trainer_against_its_own_bare_step(
    tiny_config_path, digits_data_dir, tmp_path
):
    out = tmp_path / "t.json"
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.benchmark", "--trainer",
         f"--trainer_config={tiny_config_path}", f"--trainer_data_dir={digits_data_dir}",
         "--trainer_steps=20", f"--json_out={out}"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # stdout is the JSON alone; progress went to stderr
    assert report == json.loads(out.read_text())
    trainer, bare = report["trainer"], report["bare_step"]
    assert report["steps"] == 20 and len(trainer["interval_images_per_s"]) == 10
    assert trainer["images_per_s"] > 0 and bare["images_per_s"] > 0
    assert report["trainer_over_bare"] == pytest.approx(
        trainer["images_per_s"] / bare["images_per_s"]
    )
    assert "% of the bare loop" in result.stderr


def test_trainer_mode_refuses_too_few_steps():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.benchmark", "--trainer", "--trainer_steps=5"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "FATAL ValueError: --trainer_steps=5 is invalid: must be >= 20"
    )


# --- The command line refuses bad input before any model is built -------------------------------

TINY_FLAGS = ["--variant=Ti/16", "--image_size=32", "--batch_size=2", "--modes=inference"]


@pytest.fixture
def run_main(monkeypatch, capsys):
    """run_main(args, compare=fake) → (status, stdout, stderr, calls): `vit_jax.tools.benchmark`'s main in
    this process, with `compare` (the benchmark itself) and the trainer's run replaced: `calls`
    lists what reached them, so an empty list means nothing was built or timed."""
    from absl import flags

    from vit_jax.tools import cli
    from vit_jax.tools.bench import trainer_side

    monkeypatch.setattr(cli, "quiet_logs", lambda *a, **k: None)  # no global log changes here
    calls = []

    def fake_compare(config, **kwargs):
        calls.append(("compare", kwargs["libraries"]))
        return {"results": [], "errors": [], "tiny": True}

    def fake_measure(*args):
        calls.append(("trainer", args))
        raise AssertionError("the trainer ran")

    monkeypatch.setattr(trainer_side, "measure", fake_measure)

    def run(args, compare=fake_compare):
        monkeypatch.setattr(benchmark, "compare", compare)
        capsys.readouterr()
        try:
            flags.FLAGS.unparse_flags()
            status = benchmark.main(cli.absl_flags_parser(["vit-benchmark", *args]))
        finally:
            flags.FLAGS.unparse_flags()
        out, err = capsys.readouterr()
        return status, out, err, calls

    return run


@pytest.mark.parametrize("case", ["directory", "trailing_slash", "parent_is_a_file", "trainer"])
def test_json_out_that_cannot_be_written_fails_before_anything_runs(run_main, tmp_path, case):
    (tmp_path / "file").write_text("mine")
    path = {
        "directory": f"{tmp_path}",
        "trailing_slash": f"{tmp_path}/new/",
        "parent_is_a_file": f"{tmp_path}/file/b.json",
        "trainer": f"{tmp_path}",
    }[case]
    args = ["--trainer"] if case == "trainer" else TINY_FLAGS
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out, err, calls = run_main([*args, f"--json_out={path}"])
    assert status == 1 and out == "" and calls == []
    (line,) = err.splitlines()
    assert line.startswith(f"FATAL ValueError: --json_out={path} ")
    assert ("cannot be written" if case == "parent_is_a_file" else "is a directory") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert (tmp_path / "file").read_text() == "mine"


def test_json_out_folder_is_created_only_once_the_report_exists(run_main, tmp_path):
    out_path = tmp_path / "new" / "sub" / "b.json"

    def compare(config, **kwargs):
        assert not (tmp_path / "new").exists()  # checked up front, created only at the end
        return {"results": [], "errors": []}

    status, out, err, _ = run_main([*TINY_FLAGS, f"--json_out={out_path}"], compare)
    assert status == 0, err
    assert json.loads(out) == json.loads(out_path.read_text())
    assert sorted(p.name for p in out_path.parent.iterdir()) == ["b.json"]  # no .partial left


def test_json_out_keeps_the_previous_file_when_the_run_fails(run_main, tmp_path):
    out_path = tmp_path / "b.json"
    out_path.write_text("previous report")

    def compare(config, **kwargs):
        raise RuntimeError("the run broke")

    status, _, err, _ = run_main([*TINY_FLAGS, f"--json_out={out_path}"], compare)
    assert status == 1 and "the run broke" in err
    assert out_path.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_unknown_comparison_is_refused_before_any_model(run_main):
    status, out, err, calls = run_main([*TINY_FLAGS, "--compare=timm,torchvision"])
    assert status == 1 and out == "" and calls == []
    assert err.strip() == (
        "FATAL ValueError: --compare=timm,torchvision is invalid: torchvision is not one of "
        "timm, timm_compile, hf, hf_compile"
    )


def test_a_comparison_without_torch_is_announced_as_skipped_before_our_side_runs(
    run_main, monkeypatch, capsys
):
    from vit_jax.tools.bench import torch_side

    missing = "torch and timm not installed (pip install -r requirements-bench.txt)"
    monkeypatch.setattr(torch_side, "available", lambda library: missing)
    said_before = []

    def compare(config, **kwargs):
        said_before.append(capsys.readouterr().err)
        return {"results": [], "errors": []}

    status, _, _, _ = run_main([*TINY_FLAGS, "--compare=timm"], compare)
    assert status == 0
    assert said_before == [f"WARNING --compare timm is skipped: {missing}\n"]


def test_helpshort_heads_the_flags_with_the_module_name():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.benchmark", "--helpshort"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\nvit_jax.tools.benchmark:\n" in result.stdout and "benchmark.py:" not in result.stdout
    assert "--json_out:" in result.stdout and "--[no]verbose:" in result.stdout


def test_trainer_mode_refuses_a_directory_as_json_out_before_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.tools.benchmark", "--trainer", f"--json_out={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"FATAL ValueError: --json_out={tmp_path} is a directory: give a file path, e.g. "
        f"{tmp_path}/benchmark.json"
    )
    assert list(tmp_path.iterdir()) == []
