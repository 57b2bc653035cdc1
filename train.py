"""`python train.py --config configs/digits.py --workdir workdirs/digits`: the training CLI.

It lives in `vit_jax/train_cli.py` (installed as `vit-train`); this file runs it from a checkout.
"""

import pathlib
import sys

if __name__ == "__main__":
    # Config files import `configs.common`: the checkout's root must be importable.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from vit_jax.tools import train as train_cli

    train_cli.run()
