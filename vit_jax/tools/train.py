r"""Train or fine-tune a Vision Transformer from a config file: `train.py`, `vit-train`.

  python train.py --config configs/digits.py --workdir workdirs/digits
  vit-train --config digits --workdir workdirs/digits        # installed: from any directory
  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft \
      --config.init_from=ViT-B_16.npz --config.total_steps=500

`--config` is a config file, or the name of one in `configs/` (`digits`, `finetune:ViT-B/16,cifar10`),
which works from any directory once the package is installed. Any config field can be overridden
with --config.<key>=<value> (see configs/common.py for them all); the ones that matter most:
total_steps / total_epochs, batch_size, optim.learning_rate, schedule.warmup_steps, dataset,
data_dir, init_from, checkpoint_every_steps, model.*. A length given on the command line wins over
the recipe's: `--config.total_steps` unsets the recipe's `total_epochs` and vice versa, and likewise
`schedule.warmup_steps` / `schedule.warmup_fraction` (see `ALTERNATIVES`).

Re-running the same command resumes from the newest checkpoint in the workdir. A workdir belongs to
one run: another config is refused (use a new --workdir, or --restart) and so is a second trainer.
--dry_run prints the resolved config and the model (parameters, FLOPs, tokens) and touches nothing.
Multi-host: one process per host, see README "Multi-host training" (--coordinator_address,
--num_processes, --process_id where the scheduler is not detected).

Exit status: 0 done; 1 an error (one FATAL line says what to change; --verbose adds the traceback
and the libraries' logs); 2 a command-line mistake; 130 stopped by Ctrl-C, 143 by SIGTERM (both
after saving a checkpoint: rerun the same command to resume). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from vit_jax.tools import cli

# Pairs of fields that say the same thing two ways; the trainer wants exactly one of each set. When
# the command line sets one, the recipe's value of the other is dropped (0 means unset for both).
ALTERNATIVES = (
    ("total_steps", "total_epochs"),
    ("schedule.warmup_steps", "schedule.warmup_fraction"),
)
# After a second Ctrl-C the process ends within this long, whatever the clean-up was doing.
ABORT_GRACE_S = 10.0

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with an argument: configs/<name>.py[:<arg>].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, config.json and curves.png."
)
# One process per host (see vit_jax/distributed.py): auto-detected on Cloud TPU, SLURM, Open MPI,
# Kubernetes; these three start it by hand on bare machines.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: HOST:PORT of process 0, the same on every process."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's id, 0..N-1.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300, "Seconds to wait for all processes to join at start-up."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout", 100, "Seconds after which a silent process counts as dead."
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "distributed_shutdown_timeout",
    60,
    "Seconds a process waits for the others at exit; then all end (one that failed alone does not "
    "leave the others waiting for it).",
)
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "Start over in a workdir that holds another run (it is moved to <workdir>/previous-<n>/).",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "JAX's persistent compilation cache (a rerun skips compiling): default "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/vit_jax/jax_compilation ($VIT_JAX_CACHE); '' = off.",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the resolved config and the model summary (parameters, FLOPs, tokens), then exit.",
)
cli.define_verbose_flag()
flags.declare_key_flag("verbose")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (help exits 0), with one clear line for a --config.<key> the config
    does not have and for a config file that does not load."""
    given = list(argv)
    try:
        argv = cli.absl_flags_parser(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections reports an unknown key as AttributeError(KeyError("'key'\nDid you mean...")).
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        key, _, hint = str(e.args[0] if e.args else e).strip("'\"").partition("\n")
        key = key.strip("'\"")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        print(
            f"FATAL unknown config key {key!r} in {' '.join(given) or 'the overrides'}. "
            f"{hint.strip()} Every field is listed and documented in configs/common.py.",
            file=sys.stderr,
        )
        sys.exit(cli.EXIT_USAGE)
    except Exception as e:  # noqa: BLE001  (a config file that does not import or run)
        if "--verbose" in argv:
            raise
        if isinstance(e, OSError) and "earlier failure to load" in str(e):
            _no_such_config(argv)
        print(f"FATAL the config file does not load: {cli.fatal_line(e)[6:]}", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    # An empty value (an unset shell variable) is as missing as none: "" would mean the cwd.
    missing = [name for name in ("config", "workdir") if not flags.FLAGS[name].value]
    if missing and not flags.FLAGS.dry_run:
        print(
            f"FATAL missing or empty {' and '.join('--' + m for m in missing)} (--help lists the "
            f"flags)",
            file=sys.stderr,
        )
        sys.exit(cli.EXIT_USAGE)
    if not flags.FLAGS["config"].value:
        print("FATAL missing --config (--help lists the flags)", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    if type(flags.FLAGS["config"].value).__name__ == "_ErrorConfig":  # ml_collections: not found
        _no_such_config(given)
    return argv


def _no_such_config(argv: list[str]) -> None:
    values = [value for _, _, value in _config_values(argv)]
    given = values[-1] if values else ""  # absl's: the last one
    recipes = sorted(p.stem for p in (_configs_dir() or pathlib.Path()).glob("[a-z]*.py"))
    print(
        f"FATAL --config {given}: no such config file; give a recipe name ("
        f"{', '.join(r for r in recipes if r != 'common')}) or the path of a .py file with "
        f"get_config()",
        file=sys.stderr,
    )
    sys.exit(cli.EXIT_USAGE)


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
    out = list(argv)
    for i, prefix, value in _config_values(argv):
        out[i] = prefix + recipe_path(value)
    return out


def _config_values(argv: list[str]) -> list[tuple[int, str, str]]:
    """(index, prefix, value) of each --config value in `argv`: `--config X` (X at index, no
    prefix) or `--config=X` (prefix `--config=`)."""
    found, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            found.append((i + 1, "", argv[i + 1]))
            i += 2
            continue
        if arg.startswith(("--config=", "-config=")):
            name, _, value = arg.partition("=")
            found.append((i, f"{name}=", value))
        i += 1
    return found


def recipe_path(value: str) -> str:
    path, sep, arg = value.partition(":")
    if os.path.exists(path) or _configs_dir() is None:
        return value
    name = pathlib.PurePath(path)
    if name.parts[:1] == ("configs",):
        name = pathlib.PurePath(*name.parts[1:])
    candidate = _configs_dir() / (str(name) if name.suffix else f"{name}.py")
    return f"{candidate}{sep}{arg}" if candidate.exists() else value


def _parent_and_leaf(config, path: str):
    """(the ConfigDict holding the dotted `path`'s field, the field's name)."""
    *parents, leaf = path.split(".")
    for parent in parents:
        config = config[parent]
    return config, leaf


def prefer_command_line(config, overridden: set[str]) -> None:
    """For each pair in ALTERNATIVES, a field set on the command line unsets its partner.

    `--config.total_steps=100` on a recipe that says `total_epochs=75` trains 100 steps. Setting both
    on the command line is left to the trainer's "exactly one" check.
    """
    for pair in ALTERNATIVES:
        for given, other in (pair, pair[::-1]):
            if given in overridden and other not in overridden:
                node, leaf = _parent_and_leaf(config, other)
                if node[leaf] is not None:
                    node[leaf] = type(node[leaf])(0)


def none_for_tuple_overrides(config, overridden: set[str]) -> None:
    """`--config.pp.crop_area_range=None` means None, not `(None,)`.

    ml_collections parses every value of a tuple field as a sequence, so a bare None arrives
    wrapped; recipes write None for "off" (e.g. no random-resized crop), so the command line can.
    """
    for path in overridden:
        node, leaf = _parent_and_leaf(config, path)
        if isinstance(node[leaf], tuple) and node[leaf] == (None,):
            node[leaf] = None


def _train() -> int:
    # Progress goes to stdout; the libraries' own logs only with --verbose / --verbosity=0.
    cli.quiet_logs(cli.absl_verbose())
    from vit_jax import distributed  # before any other JAX call
    from vit_jax.tools import cpu_devices

    cli.enable_compilation_cache(_COMPILATION_CACHE.value)
    multi_process = distributed.multi_process_requested(_COORDINATOR.value, _NUM_PROCESSES.value)
    config = _CONFIG.value
    cpu_devices.use_for_config(config, multi_process=multi_process)

    distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        init_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
        shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value,
    )
    from vit_jax.train import stops, trainer  # TensorFlow & co. load once the flags are valid

    overridden = set(config_flags.get_override_values(flags.FLAGS["config"]))
    none_for_tuple_overrides(config, overridden)
    prefer_command_line(config, overridden)
    if _DRY_RUN.value:
        from vit_jax.tools import dry_run

        dry_run.print_dry_run(config)
        return 0
    with stops.exit_if_abort_stalls(ABORT_GRACE_S):
        result = trainer.train_and_evaluate(config, _WORKDIR.value, restart=_RESTART.value)
    if result["preempted"]:
        status = cli.EXIT_SIGINT if result["stopped_by"] == "SIGINT" else cli.EXIT_SIGTERM
        print(
            f"Stopped by {result['stopped_by']} at step {result['step']} after saving a "
            f"checkpoint in {result['checkpoint_dir']}; rerun the same command to resume "
            f"(exit status {status}).",
            flush=True,
        )
        return status
    return 0


def main(argv):
    if len(argv) > 1:
        print(f"FATAL unexpected arguments: {argv[1:]} (--help lists the flags)", file=sys.stderr)
        return cli.EXIT_USAGE
    return cli.run_guarded(_train, cli.absl_verbose)


def run() -> None:
    """The `vit-train` console script (and `python -m vit_jax.tools.train`)."""
    sys.argv = _resolve_config_arg(sys.argv)
    sys.modules["__main__"].__doc__ = __doc__  # what absl's --help prints (train.py is a wrapper)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
