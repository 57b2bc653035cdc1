r"""Train or fine-tune a Vision Transformer from a config file: `train.py`, `vit-train`.

  python train.py --config configs/digits.py --workdir workdirs/digits
  vit-train --config digits --workdir workdirs/digits        # installed: from any directory
  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft \
      --config.init_from=ViT-B_16.npz --config.total_steps=500

`--config` is a config file, or the name of one in `configs/` (`digits`, `finetune:ViT-B/16,cifar10`),
which works from any directory once the package is installed. Any config field can be overridden
with --config.<key>=<value> (see configs/common.py for them all). A length given on the command line
wins over the recipe's: `--config.total_steps` unsets the recipe's `total_epochs` and vice versa,
and likewise `schedule.warmup_steps` / `schedule.warmup_fraction` (see `ALTERNATIVES`).
Re-running the same command resumes from the newest checkpoint in the workdir. Library logs (Orbax,
TFDS) are shown from WARNING up; `--verbosity=0` shows their INFO lines too.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Pairs of fields that say the same thing two ways; the trainer wants exactly one of each set. When
# the command line sets one, the recipe's value of the other is dropped (0 means unset for both).
ALTERNATIVES = (
    ("total_steps", "total_epochs"),
    ("schedule.warmup_steps", "schedule.warmup_fraction"),
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with an argument: configs/<name>.py[:<arg>].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, config.json and curves.png."
)
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one clear line for a --config.<key> the config does not have."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help.")
    except (AttributeError, KeyError) as e:
        # ml_collections reports an unknown key as AttributeError(KeyError("'key'\nDid you mean...")).
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        key, _, hint = str(e.args[0] if e.args else e).strip("'\"").partition("\n")
        key = key.strip("'\"")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        sys.exit(
            f"FATAL unknown config key {key!r} in {' '.join(given) or 'the overrides'}. "
            f"{hint.strip()} Every field is listed and documented in configs/common.py."
        )


def _configs_dir() -> pathlib.Path | None:
    try:
        import configs  # the recipes, installed beside vit_jax (a plain folder in a checkout)
    except ImportError:
        return None
    return pathlib.Path(configs.__file__).resolve().parent


def _resolve_config_arg(argv: list[str]) -> list[str]:
    """`--config digits` or `--config configs/digits.py` → the recipe's file wherever it lives.

    A path that exists (relative to the working directory) is used as given; otherwise a bare name
    or a `configs/...` path is looked up in the `configs` package, so the installed `vit-train`
    runs from any directory.
    """
    out, i = list(argv), 0
    while i < len(out):
        arg = out[i]
        if arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1], i = _recipe_path(out[i + 1]), i + 2
            continue
        if arg.startswith(("--config=", "-config=")):
            name, _, value = arg.partition("=")
            out[i] = f"{name}={_recipe_path(value)}"
        i += 1
    return out


def _recipe_path(value: str) -> str:
    path, sep, arg = value.partition(":")
    if os.path.exists(path) or _configs_dir() is None:
        return value
    name = pathlib.PurePath(path)
    if name.parts[:1] == ("configs",):
        name = pathlib.PurePath(*name.parts[1:])
    candidate = _configs_dir() / (str(name) if name.suffix else f"{name}.py")
    return f"{candidate}{sep}{arg}" if candidate.exists() else value


def prefer_command_line(config, overridden: set[str]) -> None:
    """For each pair in ALTERNATIVES, a field set on the command line unsets its partner.

    `--config.total_steps=100` on a recipe that says `total_epochs=75` trains 100 steps. Setting both
    on the command line is left to the trainer's "exactly one" check.
    """
    for pair in ALTERNATIVES:
        for given, other in (pair, pair[::-1]):
            if given in overridden and other not in overridden:
                *parents, leaf = other.split(".")
                node = config
                for parent in parents:
                    node = node[parent]
                if node[leaf] is not None:
                    node[leaf] = type(node[leaf])(0)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Progress goes to stdout; Orbax alone logs dozens of INFO lines per checkpoint.
        logging.set_verbosity(logging.WARNING)
    from vit_jax import train_state, trainer  # TensorFlow & co. load only once the flags are valid

    config = _CONFIG.value
    prefer_command_line(config, set(config_flags.get_override_values(flags.FLAGS["config"])))
    try:
        result = trainer.train_and_evaluate(config, _WORKDIR.value)
    except (trainer.NonFiniteLossError, train_state.InitCheckpointError, FileNotFoundError) as e:
        # The user's to fix, and the message says how; a traceback would only bury it.
        sys.exit(f"FATAL {type(e).__name__}: {e}")
    if result["preempted"]:
        print("Stopped by SIGTERM after saving; rerun the same command to resume.", flush=True)


def run() -> None:
    """The `vit-train` console script (and `python -m vit_jax.main`)."""
    sys.argv = _resolve_config_arg(sys.argv)
    sys.modules["__main__"].__doc__ = __doc__  # what absl's --help prints (train.py is a wrapper)
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
