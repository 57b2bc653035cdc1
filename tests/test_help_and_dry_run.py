"""Help and --dry_run: every command line (train.py, the `vit-*` console scripts, the tools run as
`python -m`) answers --help / -h / --helpshort / --helpfull with exit status 0, nothing on stderr
and the flags that matter; `--dry_run` prints the resolved config and the model (parameters,
tokens, FLOPs, mesh), checks the mesh and that the data are prepared, and trains, writes and
downloads nothing.
"""

import subprocess
import sys

import jax
import pytest
from helpers import REPO, subprocess_env, tiny_recipe

# (command, what its help must name). `vit-*` are the console scripts, run from another directory
# through wrappers written as pip writes them (tests/test_packaging.py installs the real ones).
TRAIN_HELP = ("--config", "--workdir", "--dry_run", "--restart", "--verbose", "143", "130")
HELP = [
    (["train.py", "--helpshort"], (*TRAIN_HELP, "(default: 'false')")),  # the flag list itself
    (["train.py", "--help"], (*TRAIN_HELP, "--coordinator_address")),
    (["train.py", "--helpfull"], (*TRAIN_HELP, "--verbosity")),  # absl's own flags too
    (["vit-train", "--helpshort"], (*TRAIN_HELP, "(default: 'false')")),
    (["-m", "vit_jax.tools.benchmark", "--help"], ("--batch_size", "--variant", "--compare")),
    (["vit-benchmark", "--helpshort"], ("--batch_size", "--variant", "--compare")),
    (["-m", "vit_jax.tools.predict", "--help"], ("--checkpoint", "--top_k", "--verbose")),
    (["vit-predict", "-h"], ("--checkpoint", "--top_k")),
    (
        ["-m", "vit_jax.tools.convert", "--help"],
        ("--to", "--variant", "--set", "npz", "timm", "hf"),
    ),
    (["vit-convert", "--help"], ("--to", "--set")),
    (["-m", "vit_jax.tools.pretrained", "--help"], ("--urls", "model")),
    (["-m", "vit_jax.tools.input_benchmark", "--help"], ("--num_batches",)),
]


@pytest.mark.parametrize("argv, names", HELP, ids=[" ".join(a) for a, _ in HELP])
def test_help_exits_0_and_lists_what_matters(argv, names, tmp_path):
    if argv[0].startswith("vit-"):
        import tomllib

        target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][argv[0]]
        module, func = target.split(":")
        script = tmp_path / argv[0]
        script.write_text(f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        cmd, cwd = [sys.executable, str(script), *argv[1:]], tmp_path
    else:
        cmd, cwd = [sys.executable, *argv], REPO
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=subprocess_env(import_checkout=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""  # help is the answer, not an error
    missing = [name for name in names if name not in result.stdout]
    assert not missing, result.stdout


def test_dry_run_prints_config_and_model_and_touches_nothing(digits_data_dir, capsys):
    from vit_jax.tools import dry_run

    config = tiny_recipe()
    config.data_dir = digits_data_dir
    dry_run.print_dry_run(config)
    out = capsys.readouterr().out
    assert '"batch_size": 32' in out
    assert "parameters: 11,082" in out and "tokens per image: 17" in out
    assert "GFLOPs per image" in out and "nothing was trained or written" in out
    assert f"on mesh {{'data': {jax.device_count()}, 'fsdp': 1}}" in out


def test_dry_run_checks_the_mesh_and_downloads_nothing(tmp_path, capsys):
    from vit_jax.tools import dry_run

    config = tiny_recipe()
    config.mesh.data = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"needs {jax.device_count() + 1} devices"):
        dry_run.print_dry_run(config)
    config = tiny_recipe()
    config.dataset, config.data_dir = "cifar10", str(tmp_path)  # not prepared there
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared.*does not download"):
        dry_run.print_dry_run(config)
    assert list(tmp_path.iterdir()) == [] and "nothing was" not in capsys.readouterr().out
