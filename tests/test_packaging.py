"""The package installs from a wheel and its console scripts run from any directory.

Built and installed offline (no build isolation, no dependencies: those are the environment's),
into a temporary target that is the only place `vit_jax` and `configs` can be imported from. The
wheel is built from a copy of the checkout: setuptools writes `build/` and `*.egg-info` beside the
sources it builds, and a test leaves the user's checkout as it found it.
"""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO, subprocess_env


def _pip(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "-q", "--no-input", "--disable-pip-version-check"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site dir, bin dir) of a fresh install of this checkout's wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    leave_out = (".*", "build", "dist", "*.egg-info", "workdirs", "__pycache__")  # not sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*leave_out), symlinks=True)
    _pip(
        "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(source), cwd=tmp
    )
    (wheel,) = (tmp / "dist").glob("vit_jax-*.whl")
    _pip("install", "--no-deps", "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel, tmp / "site", tmp / "site" / "bin"


def _run_script(installed, name, *args, cwd):
    _, site, bin_dir = installed
    env = subprocess_env(PYTHONPATH=str(site))  # the install alone, not this checkout
    return subprocess.run(
        [str(bin_dir / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # builds and installs a wheel (~20 s)
def test_wheel_holds_the_library_and_the_recipes_not_the_tests(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "vit_jax/model/vit.py" in names and "vit_jax/interop/formats/timm.py" in names
    assert "configs/digits.py" in names and "configs/common.py" in names
    assert not any(n.startswith(("tests/", "notebooks/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for name in ("vit-train", "vit-predict", "vit-convert", "vit-benchmark"):
        assert f"{name} = " in scripts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit-predict", "vit-convert"])
def test_argparse_scripts_show_help_from_another_directory(installed, name, tmp_path):
    result = _run_script(installed, name, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


@pytest.mark.slow  # one tiny model compiled
def test_benchmark_script_runs_from_another_directory(installed, tmp_path):
    result = _run_script(
        installed,
        "vit-benchmark",
        "--variant=Ti/16",
        "--image_size=32",
        "--batch_size=2",
        "--steps=1",
        "--repeats=1",
        "--modes=inference",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # one JSON document; the table goes to stderr
    assert [r["mode"] for r in report["results"]] == ["inference"]


@pytest.mark.slow  # a 1-step training run (~30-60 s)
def test_train_script_finds_its_recipe_by_name_from_another_directory(
    installed, tmp_path, digits_data_dir
):
    result = _run_script(
        installed,
        "vit-train",
        "--config=digits",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data_dir={digits_data_dir}",
        "--config.total_steps=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final test accuracy:" in result.stdout
    assert (tmp_path / "run" / "config.json").exists()
