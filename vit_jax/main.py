r"""Train or fine-tune a Vision Transformer from a config file.

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft \
      --config.init_from=ViT-B_16.npz --config.total_steps=500

Any config field can be overridden with --config.<key>=<value> (see configs/common.py for them all).
Re-running the same command resumes from the newest checkpoint in the workdir. Library logs (Orbax,
TFDS) are shown from WARNING up; `--verbosity=0` shows their INFO lines too.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        # Progress goes to stdout; Orbax alone logs dozens of INFO lines per checkpoint.
        logging.set_verbosity(logging.WARNING)
    from vit_jax import train_state, trainer  # TensorFlow & co. load only once the flags are valid

    try:
        result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (trainer.NonFiniteLossError, train_state.InitCheckpointError, FileNotFoundError) as e:
        # The user's to fix, and the message says how; a traceback would only bury it.
        sys.exit(f"FATAL {type(e).__name__}: {e}")
    if result["preempted"]:
        print("Stopped by SIGTERM after saving; rerun the same command to resume.", flush=True)


if __name__ == "__main__":
    # The config file may import `configs.common`; the repository root must be importable.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    app.run(main, flags_parser=_parse_flags)
