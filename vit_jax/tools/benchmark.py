r"""Model throughput: images/s, FLOPs, peak memory and MFU of the train step and of inference,
optionally side by side with timm / HF (eager and torch.compile) on the same machine.

  python -m vit_jax.tools.benchmark --variant ViT-B/16 --batch_size 8 --compare timm --json_out b16.json
  python -m vit_jax.tools.benchmark --variant ViT-B/16 --batch_size 256 --dtype bfloat16 --compare timm_compile

Our train step is the trainer's own (`train_step.make_train_step`, data-parallel over every local
device) with SGD + momentum (the comparison's optimizer; `--optimizer adamw` for the trainer's
usual one); inference is a jitted `model.apply`. Every side is compiled / warmed up first, then the
sides are timed alternately, `--repeats` runs of `--steps` steps each, and the median is reported,
so load from other processes hits all sides alike: on a shared machine read the ratio column.
FLOPs per image come from XLA's cost analysis and are cross-checked against the analytic count
(`vit_jax.tools.bench.flops`; ViT-B/16 at 224 px: 35.1 GFLOP forward). MFU = FLOP/s / peak, with the
peak from `--peak_tflops` or, on a known GPU, its bf16 dense peak. Peak memory is per device, from
the compiled program's memory analysis. On CPU our side runs on one device per core that the batch
divides (`--cpu_devices`, as train.py does; measured faster than one device with XLA's intra-op
threads, README Performance).
In a comparison our model uses the exact (erf) GELU as timm and HF do, so both sides compute the
same function; the JSON records it. Prints a table and one JSON document (`--json_out` to a file).

  python -m vit_jax.tools.benchmark --trainer                 # the digits main job vs its bare step

`--trainer` times the real trainer (input pipeline, dispatch, logging) on a recipe against a bare
jitted loop of the same step on one device-resident batch (`vit_jax.tools.bench.trainer_side`): the
ratio is what everything around the step costs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import time
from typing import Any

import jax
from absl import app, flags

from vit_jax.model.config import ViTConfig, get_config
from vit_jax.tools import cli, cpu_devices
from vit_jax.tools.bench import flops as flops_lib
from vit_jax.tools.bench import jax_side, torch_side
from vit_jax.tools.bench.report import (
    check_json_out,
    format_table,
    format_trainer_table,
    write_json,
)

# bf16 dense peak TFLOP/s per device (vendor data sheets), for MFU without --peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "B200": 2250.0}


def peak_tflops_of(device_kind: str, dtype: str) -> float | None:
    if dtype not in ("bfloat16", "float16"):
        return None
    for name, tflops in PEAK_TFLOPS.items():
        if name in device_kind:
            return tflops
    return None


def time_alternating(runners: dict[str, Any], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each runner, timed in turns so shared-machine load hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.run(steps)
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def _row(library, config, mode, batch_size, runner, step_seconds, peak_tflops) -> dict[str, Any]:
    median = statistics.median(step_seconds)
    row: dict[str, Any] = {
        "library": library,
        "mode": mode,
        "batch_size": batch_size,
        "median_step_s": median,
        "step_s": step_seconds,
        "images_per_s": batch_size / median,
        "compile_s": runner.compile_s,
        "compile_only_s": getattr(runner, "compile_only_s", None),
        "peak_memory_mb": runner.peak_bytes / 2**20 if runner.peak_bytes else None,
    }
    analytic = (
        flops_lib.train_step_flops(config) if mode == "train" else flops_lib.forward_flops(config)
    )
    row["analytic_gflops_per_image"] = analytic / 1e9
    if runner.flops:
        row["xla_gflops_per_image"] = runner.flops / batch_size / 1e9
    if peak_tflops:
        row["mfu"] = analytic * batch_size / median / (peak_tflops * 1e12 * jax.device_count())
    return row


def _free_memory(libraries) -> None:
    """Drop what the last mode held, so the next mode (and torch beside JAX) has the device."""
    gc.collect()
    if libraries and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(
    config: ViTConfig,
    *,
    modes: tuple[str, ...] = ("train", "inference"),
    batch_size: int = 32,
    steps: int = 5,
    repeats: int = 3,
    libraries: tuple[str, ...] = (),
    optimizer: str = "sgd",
    peak_tflops: float | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark our model and each comparison library; every failure is recorded, none aborts.
    `compiler_options` (XLA options, `jax_side.parse_compiler_options`) apply to our side."""
    device = jax.devices()[0].device_kind
    peak_tflops = peak_tflops or peak_tflops_of(device, config.dtype)
    rows, errors = [], []
    for mode in modes:
        runners: dict[str, Any] = {}
        try:
            runners["vit_jax"] = jax_side.build(
                config, mode, batch_size, optimizer, compiler_options=compiler_options
            )
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the others still run
            errors.append({"library": "vit_jax", "mode": mode, "error": f"{type(e).__name__}: {e}"})
        for library in libraries:
            reason = torch_side.available(library)
            if reason:
                errors.append({"library": library, "mode": mode, "skipped": reason})
                continue
            try:
                runners[library] = torch_side.build(library, config, mode, batch_size)
            except Exception as e:  # noqa: BLE001
                errors.append(
                    {"library": library, "mode": mode, "error": f"{type(e).__name__}: {e}"}
                )
        seconds = time_alternating(runners, steps, repeats)
        mode_rows = [
            _row(name, config, mode, batch_size, runner, seconds[name], peak_tflops)
            for name, runner in runners.items()
        ]
        ours = next((r for r in mode_rows if r["library"] == "vit_jax"), None)
        for row in mode_rows:
            if ours is not None:
                row["vit_jax_speedup"] = ours["images_per_s"] / row["images_per_s"]
        rows.extend(mode_rows)
        del runners
        _free_memory(libraries)
    return {
        "device": device,
        "num_devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "model": config.to_dict(),
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "optimizer": optimizer,
        "peak_tflops": peak_tflops,
        "compiler_options": dict(compiler_options or {}),
        "results": rows,
        "errors": errors,
    }


def benchmark(
    variant: str | None,
    *,
    mode: str = "train",
    batch_size: int = 32,
    steps: int = 5,
    repeats: int = 3,
    peak_tflops: float | None = None,
    optimizer: str = "sgd",
    **model_overrides,
) -> dict[str, Any]:
    """Our model alone, one mode: the `compare` row of vit_jax plus the run's facts."""
    if mode not in jax_side.MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(jax_side.MODES)}")
    config = get_config(variant, **model_overrides)
    report = compare(
        config,
        modes=(mode,),
        batch_size=batch_size,
        steps=steps,
        repeats=repeats,
        optimizer=optimizer,
        peak_tflops=peak_tflops,
    )
    if report["errors"]:
        raise RuntimeError(report["errors"][0]["error"])
    (row,) = report["results"]
    return {
        **row,
        "variant": variant or "custom",
        "image_size": list(config.image_size),
        "dtype": config.dtype,
        "device": report["device"],
        "num_devices": report["num_devices"],
        "gflops_per_image": row.get("xla_gflops_per_image"),
    }


if __name__ == "__main__":
    # `python -m vit_jax.tools.benchmark` runs the module under its import name, as `vit-benchmark` does:
    # its flags are then defined (and listed by --helpshort) as vit_jax.tools.benchmark, not a file path.
    from vit_jax.tools.benchmark import run

    run()  # exits

_VARIANT = flags.DEFINE_string("variant", "ViT-B/16", "Model variant, e.g. ViT-Ti/16.")
_MODES = flags.DEFINE_list("modes", ["train", "inference"], "train and/or inference.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 224, "Square image side.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 | bfloat16 (f32 params).")
_ATTENTION = flags.DEFINE_string("attention_impl", "auto", "auto | einsum | xla | cudnn.")
_SCAN = flags.DEFINE_bool("scan", False, "nn.scan over the layers (compiles one layer, not L).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "sgd", jax_side.OPTIMIZERS, "Train-step optimizer.")
_COMPARE = flags.DEFINE_list(
    "compare",
    [],
    f"Libraries to time beside ours: {', '.join(torch_side.LIBRARIES)} (without torch / timm / "
    "transformers installed, requirements-bench.txt, that side is skipped with a warning).",
)
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per side; the median is reported.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for MFU.")
_COMPILER_OPTIONS = flags.DEFINE_multi_string(
    "compiler_option",
    [],
    "NAME=VALUE: an XLA option for our side's compilation only, e.g. "
    "xla_gpu_enable_triton_gemm=false (repeatable; checked before any model is built).",
)
# A command-line mistake (exit 2, as `--set` without '=' is for predict and convert).
flags.register_validator(
    "compiler_option",
    lambda items: all(item.partition("=")[0].strip() and "=" in item for item in items),
    message="each --compiler_option must be NAME=VALUE, e.g. xla_gpu_enable_triton_gemm=false",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    0,
    "CPU only: devices XLA's CPU platform exposes; 0 = one per core that the batch divides (as "
    "train.py does), set before JAX starts. XLA_FLAGS / JAX_NUM_CPU_DEVICES win.",
)
_JSON = flags.DEFINE_string(
    "json_out",
    None,
    "Also write the JSON report to this file (a missing folder is created; the path is checked "
    "before anything runs).",
)
_RUNTIME = flags.DEFINE_list(
    "runtime",
    [],
    "onnx,tflite,savedmodel,stablehlo: inference of the exported file in its runtime "
    "beside JAX, and the file size (vit_jax.tools.bench.runtimes).",
)
_TRAINER = flags.DEFINE_bool(
    "trainer",
    False,
    "Instead: time the real trainer (train_and_evaluate) on --trainer_config against a bare "
    "jitted loop of its own step; prints both images/s and their ratio.",
)
_TRAINER_CONFIG = flags.DEFINE_string(
    "trainer_config", "digits", "--trainer: a recipe name in configs/ or a config file."
)
_TRAINER_STEPS = flags.DEFINE_integer("trainer_steps", 440, "--trainer: steps of each side.")
_TRAINER_DATA_DIR = flags.DEFINE_string(
    "trainer_data_dir", None, "--trainer: config.data_dir (the TFDS data directory)."
)
cli.define_verbose_flag()
flags.declare_key_flag("verbose")


def main(argv):
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    if len(argv) > 1:
        print(f"FATAL unexpected arguments: {argv[1:]} (--help lists the flags)", file=sys.stderr)
        return cli.EXIT_USAGE
    cli.quiet_logs(cli.absl_verbose(), tensorflow=_TRAINER.value)  # --trainer reads data with TF
    return cli.run_guarded(_run, cli.absl_verbose)


def _check_flags() -> None:
    for flag in (_BATCH, _IMAGE, _STEPS, _REPEATS):
        if flag.value < 1:
            raise ValueError(f"--{flag.name}={flag.value} is invalid: must be >= 1")
    unknown = sorted(set(_MODES.value) - {"train", "inference"})
    if unknown or not _MODES.value:
        raise ValueError(f"--modes={','.join(_MODES.value)} is invalid: allowed train, inference")
    if _PEAK.value is not None and _PEAK.value <= 0:
        raise ValueError(f"--peak_tflops={_PEAK.value} is invalid: must be > 0")
    unknown = [name for name in _COMPARE.value if name not in torch_side.LIBRARIES]
    if unknown:
        raise ValueError(
            f"--compare={','.join(_COMPARE.value)} is invalid: {', '.join(unknown)} is not one "
            f"of {', '.join(torch_side.LIBRARIES)}"
        )


def _announce_skipped_comparisons() -> None:
    """Says before anything is timed which --compare sides cannot run here (torch missing)."""
    for library in _COMPARE.value:
        if reason := torch_side.available(library):
            print(f"WARNING --compare {library} is skipped: {reason}", file=sys.stderr, flush=True)


def load_recipe(name_or_path: str):
    """A config from a recipe name (`digits`) or a config file path (`configs/digits.py[:arg]`)."""
    import importlib.util
    import pathlib

    from vit_jax.tools import train as train_main

    path, _, arg = train_main.recipe_path(name_or_path).partition(":")
    if not pathlib.Path(path).is_file():
        raise ValueError(f"--trainer_config={name_or_path!r}: no such recipe or config file")
    spec = importlib.util.spec_from_file_location("benchmarked_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _run_trainer() -> int:
    import tempfile

    from vit_jax.tools.bench import trainer_side

    if _TRAINER_STEPS.value < 2 * trainer_side.INTERVALS:
        raise ValueError(
            f"--trainer_steps={_TRAINER_STEPS.value} is invalid: must be >= "
            f"{2 * trainer_side.INTERVALS}"
        )
    config = load_recipe(_TRAINER_CONFIG.value)
    if _TRAINER_DATA_DIR.value:
        config.data_dir = _TRAINER_DATA_DIR.value
    if _CPU_DEVICES.value:
        config.cpu_devices = _CPU_DEVICES.value
    # The devices train.py would run the recipe on (set before JAX starts).
    cpu_devices.use_for_config(config)
    # The trainer's progress lines go to stderr: stdout carries only the JSON document.
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        report = trainer_side.measure(config, _TRAINER_STEPS.value, workdir)
    report["config"] = _TRAINER_CONFIG.value
    print(format_trainer_table(report), file=sys.stderr)
    _emit(report)
    return 0


def _run_runtimes() -> int:
    from vit_jax.tools.bench import runtimes

    runtimes.check(_RUNTIME.value)
    config = get_config(_VARIANT.value, image_size=_IMAGE.value, num_classes=_NUM_CLASSES.value)
    rows = runtimes.measure(config, _BATCH.value, _RUNTIME.value, _STEPS.value, _REPEATS.value)
    print(runtimes.format_rows(rows, _VARIANT.value), file=sys.stderr)
    _emit({"variant": _VARIANT.value, "runtimes": rows})
    return 0


def _emit(report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2)
    if _JSON.value:
        write_json(_JSON.value, text + "\n")
    print(text, flush=True)


def _run() -> int:
    check_json_out(_JSON.value)  # before anything runs: a bad path costs no run
    if _TRAINER.value:
        return _run_trainer()
    if _RUNTIME.value:
        return _run_runtimes()
    _check_flags()
    _announce_skipped_comparisons()
    cpu_devices.use(cpu_devices.count(_CPU_DEVICES.value, [_BATCH.value], cpu_devices.cores()))
    overrides = dict(
        image_size=_IMAGE.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION.value,
        num_classes=_NUM_CLASSES.value,
        scan=_SCAN.value,
    )
    if _COMPARE.value:
        overrides["gelu_approximate"] = False  # the same function as timm / HF
    config = get_config(_VARIANT.value, **overrides)
    compiler_options = jax_side.parse_compiler_options(_COMPILER_OPTIONS.value)
    report = compare(
        config,
        modes=tuple(_MODES.value),
        batch_size=_BATCH.value,
        steps=_STEPS.value,
        repeats=_REPEATS.value,
        libraries=tuple(_COMPARE.value),
        optimizer=_OPTIMIZER.value,
        peak_tflops=_PEAK.value,
        compiler_options=compiler_options,
    )
    report["variant"] = _VARIANT.value
    print(format_table(report), file=sys.stderr)
    _emit(report)
    return 0


def run() -> None:
    """The `vit-benchmark` console script."""
    sys.modules["__main__"].__doc__ = __doc__  # what absl's --help prints
    app.run(main, flags_parser=cli.absl_flags_parser)
