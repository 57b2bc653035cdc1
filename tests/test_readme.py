"""Every command the README and the config docstrings show is run here, so none can go stale.

Which commands:
  README.md   every line of every ```bash block (a trailing backslash continues a line; `# ...`
              comments are dropped). ```sh blocks are shown to the reader and NOT run: that is the
              place for commands that need a cluster, a GPU/TPU or the network.
  configs/*.py  every command in a config's docstring: a line starting with `python ` or `vit-`,
              plus its backslash continuations. Those needing data or weights that cannot be had
              offline are listed in NOT_RUN with the reason; their config is still built from the
              command's own `--config` and `--config.<key>=` arguments, so a typo still fails.

How long commands stay short: SHORTER maps a command's start (a pattern) to arguments appended.
A length given on the command line wins over a recipe's (see `vit_jax/tools/train.py`), so appending
`--config.total_steps=2` turns a 3-minute recipe into one compile and two steps, whatever the recipe
says. A new README command that is slow gets a SHORTER entry; one that is fast needs nothing.
`make <target>` runs what `make -n <target>` prints, shortened the same way; `make test`'s pytest
line only collects the suite (running the whole suite from inside it would recurse).

Console scripts (`vit-train`, ...) run through wrappers written from pyproject.toml's
[project.scripts] exactly as pip writes them, calling this checkout's code (the shared environment
is never pip-installed into; tests/test_packaging.py installs the built wheel to check them).

Where they run: in order, all in one fresh temporary directory (so a command finds what an earlier
one made, as for a reader following the README) whose entries are links to this checkout's (so
`workdirs/...` lands there, never in the user's workdirs), with this checkout's root first on
PYTHONPATH, `python` being this interpreter, and TFDS data in the session's temporary data dir.
Absolute scratch paths in commands (`/tmp/w`) are replaced by folders inside that directory.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import tomllib
from helpers import REPO, subprocess_env

# A pattern at the start of a command (after `make -n` expansion) -> arguments appended to keep it
# short. Any training command: two steps, one evaluation at the end.
TRAIN = r"(python (train\.py|-m vit_jax\.tools\.train)|vit-train)\b"
SHORTER = {
    # Pre-training on generated fractals: 2 steps, and 10 classes of 30 instead of 30,000 images
    # to generate (the fine-tuning command after it reads this checkpoint all the same).
    r"python train\.py --config configs/digits\.py:fractal\b": "--config.total_steps=2 "
    "--config.eval_every_steps=0 --config.dataset=fractaldb/c10_i30_r32",
    TRAIN: "--config.total_steps=2 --config.eval_every_steps=0",
    r"python -m vit_jax\.tools\.input_benchmark\b": "--num_batches 2 --warmup 1 --num_images 64",
    r"(python -m vit_jax\.tools\.benchmark|vit-benchmark)\b": "--steps 1 --repeats 1",
}

# Commands (by their start) that cannot run offline on a CPU, and why.
NOT_RUN = {
    "python train.py --config configs/finetune.py": "downloads CIFAR-10 and a published "
    "ViT-B/16 checkpoint, and fine-tunes it at 384 px",
    "python train.py --config configs/pretrain.py": "needs ImageNet prepared in TFDS",
}

# Scratch paths that commands write to, mapped into the run's temporary directory.
SCRATCH = ("/tmp/w",)


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> 'module:function'."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _join_continuations(lines: list[str]) -> list[str]:
    commands, current = [], ""
    for line in lines:
        line = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if not line.strip() and not current:
            continue
        current += " " + line.strip() if current else line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current:
            commands.append(re.sub(r"\s+", " ", current))
        current = ""
    return commands


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    return [c for block in blocks for c in _join_continuations(block.splitlines())]


def docstring_commands() -> list[tuple[str, str]]:
    found = []
    for path in sorted((REPO / "configs").glob("*.py")):
        doc = re.match(r'\s*r?"""(.*?)"""', path.read_text(), flags=re.S)
        lines = doc.group(1).splitlines() if doc else []
        for i, line in enumerate(lines):
            if line.strip().startswith(("python ", "vit-")):
                block = [line]
                while block[-1].rstrip().endswith("\\") and i + len(block) < len(lines):
                    block.append(lines[i + len(block)])
                found += [(path.name, c) for c in _join_continuations(block)]
    return found


def _expand_make(command: str) -> list[str]:
    """`make X` -> the commands it would run (`make -n`), without its setup steps."""
    # Not make's own variables: under `make test` they would make it print directory changes.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "-n", "--no-print-directory", *shlex.split(command)[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    venv = re.compile(r"(^|\s)\.venv/bin/")
    lines = [venv.sub(r"\1", line) for line in result.stdout.splitlines()]
    # The setup target (venv + pip install) is make's own business, not a README example.
    return [
        line
        for line in lines
        if line.strip()
        and not re.match(r"make(\[\d+\])?:", line)
        and not re.search(r"\bvenv\b|pip|touch", line)
    ]


def _runnable(command: str) -> str:
    for scratch in SCRATCH:
        command = command.replace(scratch, "scratch" + scratch.replace("/", "_"))
    if re.search(r"(^|\s)(python -m )?pytest\b", command):
        return command.replace(" -n 2", "").replace(" --dist loadfile", "") + " --collect-only -q"
    for pattern, extra in SHORTER.items():
        if re.match(pattern, command) and not re.search(r"\s--(help|dry)", command):
            return f"{command} {extra}"
    return command


def _all_commands() -> list[tuple[str, str, list[str]]]:
    """(where, command as shown, what it runs): `make X` expanded; each distinct run kept once."""
    seen, out = set(), []
    for where, shown in [("README.md", c) for c in readme_commands()] + docstring_commands():
        runs = _expand_make(shown) if shown.startswith("make ") else [shown]
        runs = [c for c in runs if c not in seen]
        seen.update(runs)
        if runs:
            out.append((where, shown, runs))
    return out


COMMANDS = _all_commands()


def _reason_not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def _run(command: str, cwd: pathlib.Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {command}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, digits_data_dir) -> tuple[pathlib.Path, dict]:
    """A working directory that looks like the checkout (links) and an environment for it.

    One for the whole module: the commands run in README order, so a later one finds what an
    earlier one made (a workdir to predict from), as for a reader following the README.
    """
    tmp_path = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in ("workdirs", ".git"):
            (tmp_path / entry.name).symlink_to(entry)
    bin_dir = pathlib.Path(sys.executable).parent
    env = subprocess_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        TFDS_DATA_DIR=digits_data_dir,
    )
    # The console scripts (`vit-train`, ...) as pip would write them, for this checkout's code.
    scripts = tmp_path / "bin"
    scripts.mkdir()
    for name, target in console_scripts().items():
        module, func = target.split(":")
        (scripts / name).write_text(
            f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        (scripts / name).chmod(0o755)
    env["PATH"] = f"{scripts}{os.pathsep}{env['PATH']}"
    if not (bin_dir / "python").exists():
        (scripts / "python").symlink_to(sys.executable)
    return tmp_path, env


def test_the_readme_has_commands_and_every_one_is_found():
    commands = readme_commands()
    assert "make train" in commands and "make test" in commands
    assert any(c.startswith("python train.py --config configs/digits.py") for c in commands)
    # Joined continuation lines are whole commands: nothing dangles.
    assert not any(c.endswith("\\") for c in commands)


def test_every_slow_command_has_a_way_to_be_short():
    """A training command without a SHORTER entry or a NOT_RUN reason would run for minutes."""
    for _, _, runs in COMMANDS:
        for c in runs:
            if re.match(TRAIN, c) and not _reason_not_run(c) and "--help" not in c:
                assert _runnable(c) != c, f"no SHORTER entry for {c!r}"


@pytest.mark.slow  # each command is a process; the training ones compile a model (~20-60 s)
@pytest.mark.parametrize(
    ("where", "shown", "runs"), COMMANDS, ids=[shown[:70] for _, shown, _ in COMMANDS]
)
def test_command_runs(where, shown, runs, sandbox):
    cwd, env = sandbox
    for c in runs:
        if _reason_not_run(c):
            _check_config_builds(c)
            continue
        runnable = _runnable(c)
        result = _run(runnable, cwd, env)
        assert result.returncode == 0, (
            f"{where}: {runnable!r} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
        )
        trains = re.match(TRAIN, c) and not re.search(r"\s--(help|dry)", c)
        if trains:
            assert "Final test accuracy:" in result.stdout, result.stdout[-2000:]


def _check_config_builds(command: str) -> None:
    """A command that cannot run offline: its config and overrides still make a model."""
    from absl import flags
    from ml_collections import config_flags

    from vit_jax.train import plan

    args = shlex.split(command)
    config_arg = next(a for a in args if a.startswith("--config=") or a == "--config")
    if config_arg == "--config":
        config_arg = "--config=" + args[args.index("--config") + 1]
    argv = ["train.py", config_arg.replace("=configs/", f"={REPO}/configs/", 1)]
    argv += [a for a in args if a.startswith("--config.")]
    holder = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", flag_values=holder, sys_argv=argv)
    sys.path.insert(0, str(REPO))  # the recipes import `configs.common`
    holder(argv)
    model = plan.vit_config_for(config.value, num_classes=10, num_channels=3)
    assert model.image_size == (config.value.image_size,) * 2
