r"""Train or fine-tune a Vision Transformer from a config file.

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft \
      --config.init_from=ViT-B_16.npz --config.total_steps=500

Any config field can be overridden with --config.<key>=<value> (see configs/common.py for them all);
the ones that matter most: total_steps / total_epochs, batch_size, optim.learning_rate,
schedule.warmup_steps, dataset, data_dir, init_from, checkpoint_every_steps, model.*.

Re-running the same command resumes from the newest checkpoint in the workdir. A workdir belongs to
one run: another config is refused (use a new --workdir, or --restart) and so is a second trainer.
--dry_run prints the resolved config and the model (parameters, FLOPs, tokens) and touches nothing.

Exit status: 0 done; 1 an error (one FATAL line says what to change; --verbose adds the traceback
and the libraries' logs); 2 a command-line mistake; 130 stopped by Ctrl-C, 143 by SIGTERM (both
after saving a checkpoint: rerun the same command to resume). A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from vit_jax import cli

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
_RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "Start over in a workdir that holds another run (it is moved to <workdir>/previous-<n>/).",
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the resolved config and the model summary (parameters, FLOPs, tokens), then exit.",
)
cli.define_verbose_flag()
flags.declare_key_flag("verbose")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (help exits 0), with one clear line for a --config.<key> the config
    does not have and for a config file that does not load."""
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
        print(f"FATAL the config file does not load: {cli.fatal_line(e)[6:]}", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    missing = [name for name in ("config", "workdir") if flags.FLAGS[name].value is None]
    if missing and not flags.FLAGS.dry_run:
        print(
            f"FATAL missing {' and '.join('--' + m for m in missing)} (--help lists the flags)",
            file=sys.stderr,
        )
        sys.exit(cli.EXIT_USAGE)
    if flags.FLAGS.config is None:
        print("FATAL missing --config (--help lists the flags)", file=sys.stderr)
        sys.exit(cli.EXIT_USAGE)
    return argv


def _train() -> int:
    # Progress goes to stdout; the libraries' own logs only with --verbose / --verbosity=0.
    cli.quiet_logs(cli.absl_verbose())
    from vit_jax import distributed  # before any other JAX call

    distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        init_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
    )
    from vit_jax import trainer  # TensorFlow & co. load only once the flags are valid

    if _DRY_RUN.value:
        from vit_jax import summary

        summary.print_dry_run(_CONFIG.value)
        return 0
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)
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


if __name__ == "__main__":
    # The config file may import `configs.common`; the repository root must be importable.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    app.run(main, flags_parser=_parse_flags)
