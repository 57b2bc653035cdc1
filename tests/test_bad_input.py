"""Bad input to the four command lines: exit status, one FATAL line naming the value, workdir as it was.

Every case runs the real `main` of train.py (vit_jax/tools/train.py), `vit_jax.tools.predict`,
`vit_jax.tools.convert` and `vit_jax.tools.benchmark` in this process (the flags are re-parsed per
case), against one shared tiny trained workdir, and fails before any JAX compilation.
"""

import importlib
import os
import sys

import pytest
from absl import flags
from helpers import REPO

from vit_jax.tools import cli

MISSING = "/nonexistent/vit-jax-test"


def snapshot(root: str) -> dict:
    """Every path below `root` with its size and modification time (None if root is missing)."""
    if not os.path.exists(root):
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """run_cli(kind, args) → (status, stdout, stderr), running that CLI's main in-process."""
    monkeypatch.setattr(cli, "quiet_logs", lambda *a, **k: None)  # no global log changes here
    monkeypatch.syspath_prepend(str(REPO))

    def run(kind: str, args: list[str]):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", [kind, *args])  # config_flags reads overrides from it
        try:
            if kind in ("train", "benchmark"):
                module = importlib.import_module(
                    "vit_jax.tools.train" if kind == "train" else "vit_jax.tools.benchmark"
                )
                parse = module.parse_flags if kind == "train" else cli.absl_flags_parser
                flags.FLAGS.unparse_flags()
                argv = parse([kind, *args])
                status = module.main(argv)
            else:
                module = importlib.import_module(f"vit_jax.tools.{kind}")
                status = module.main(args)
        except SystemExit as e:
            status = e.code
        finally:
            flags.FLAGS.unparse_flags()
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)  # config_flags defines one flag per override
        out, err = capsys.readouterr()
        return status, out, err

    return run


# (id, cli, args, expected status, text the FATAL line must contain). In the args, {cfg} is the
# tiny config, {data} the digits data dir, {work} the shared workdir, {fresh} a new path, {img} an
# image file.
CASES = [
    ("lr_negative", "train", ["--config.optim.learning_rate=-0.1"], 1, "learning_rate=-0.1"),
    ("lr_zero", "train", ["--config.optim.learning_rate=0.0"], 1, "learning_rate=0.0"),
    ("weight_decay", "train", ["--config.optim.weight_decay=-1.0"], 1, "weight_decay=-1.0"),
    ("grad_clip", "train", ["--config.optim.grad_clip_norm=-2.0"], 1, "grad_clip_norm=-2.0"),
    ("mixup", "train", ["--config.pp.mixup_alpha=-0.5"], 1, "mixup_alpha=-0.5"),
    ("smoothing", "train", ["--config.pp.label_smoothing=1.5"], 1, "label_smoothing=1.5"),
    ("rotate", "train", ["--config.pp.rotate_degrees=-5"], 1, "rotate_degrees=-5.0"),
    ("scale", "train", ["--config.pp.scale_range=(1.2,0.8)"], 1, "scale_range=(1.2, 0.8)"),
    ("keep_zero", "train", ["--config.keep_checkpoints=0"], 1, "keep_checkpoints=0"),
    ("length", "train", ["--config.total_steps=-5"], 1, "total_steps=-5"),
    ("log_every", "train", ["--config.log_every_steps=-1"], 1, "log_every_steps=-1"),
    ("warmup", "train", ["--config.schedule.warmup_steps=500"], 1, "warmup_steps=500"),
    ("batch", "train", ["--config.batch_size=0"], 1, "batch_size=0"),
    ("accum", "train", ["--config.accum_steps=3"], 1, "accum_steps=3"),
    ("mesh", "train", ["--config.mesh.data=3"], 1, "3"),
    ("dataset", "train", ["--config.dataset=no_such_dataset_xyz"], 1, "no_such_dataset_xyz"),
    ("heads", "train", ["--config.model.num_heads=5"], 1, "num_heads=5"),
    ("pool", "train", ["--config.model.pool=bogus"], 1, "bogus"),
    ("dtype", "train", ["--config.model.dtype=float8"], 1, "float8"),
    ("loss", "train", ["--config.loss=hinge"], 1, "hinge"),
    ("init_from", "train", [f"--config.init_from={MISSING}"], 1, MISSING),
    ("dispatch", "train", ["--config.steps_per_dispatch=0"], 1, "steps_per_dispatch=0"),
    ("empty_workdir", "train", ["--workdir="], 2, "missing or empty --workdir"),
    ("no_config", "train", ["--config=configs/nope.py"], 2, "configs/nope.py: no such config"),
    ("unknown_key", "train", ["--config.totl_steps=3"], 2, "totl_steps"),
    ("bad_type", "train", ["--config.total_steps=many"], 2, "many"),
    ("reused_seed", "train_reuse", ["--config.seed=7"], 1, "seed 0 → 7"),
    ("reused_lr", "train_reuse", ["--config.optim.learning_rate=0.5"], 1, "learning_rate"),
    ("shorter", "train_reuse", ["--config.total_steps=1"], 1, "checkpoint at step 3"),
    ("predict_ckpt", "predict", ["--checkpoint", MISSING, "{img}"], 1, MISSING),
    ("predict_image", "predict", ["--checkpoint", "{work}", "/no/such.png"], 1, "/no/such.png"),
    ("predict_top_k", "predict", ["--checkpoint", "{work}", "--top_k", "0", "{img}"], 2, "0"),
    ("convert_src", "convert", [MISSING, "{fresh}/x.npz", "--to", "npz"], 1, MISSING),
    ("convert_to", "convert", ["{work}", "{fresh}/x.npz", "--to", "caffe"], 2, "caffe"),
    ("bench_batch", "benchmark", ["--batch_size=0"], 1, "batch_size=0"),
    ("bench_modes", "benchmark", ["--modes=fly"], 1, "fly"),
    ("bench_variant", "benchmark", ["--variant=ViT-Q/16", "--modes=inference"], 1, "ViT-Q/16"),
    ("bench_flag", "benchmark", ["--bogus_flag=1"], 2, "bogus_flag"),
    ("bench_compiler_option", "benchmark", ["--compiler_option=xla_x"], 2, "NAME=VALUE"),
    ("convert_under_file", "convert", ["{work}", "{img}/x.npz", "--to", "npz"], 1, "is a file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_fatal_line_and_changes_nothing(
    case, run_cli, tiny_workdir, tiny_config_path, digits_data_dir, tmp_path
):
    _, kind, args, status, named = case
    fresh = str(tmp_path / "fresh")
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("L", (8, 8), 255).save(image)
    args = [a.format(work=tiny_workdir, fresh=fresh, img=image) for a in args]
    if kind.startswith("train"):
        workdir = tiny_workdir if kind == "train_reuse" else fresh
        args = [
            f"--config={tiny_config_path}",
            f"--workdir={workdir}",
            f"--config.data_dir={digits_data_dir}",
            *args,
        ]
        kind = "train"
    before, before_fresh = snapshot(tiny_workdir), snapshot(fresh)

    code, out, err = run_cli(kind, args)

    assert code == status, (out, err)
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1 and err.strip() == fatal[0], err  # exactly one line, no traceback
    assert named in fatal[0]
    assert snapshot(tiny_workdir) == before  # the shared workdir is untouched
    assert snapshot(fresh) == before_fresh == {}  # and a new one is not even created


def test_the_table_covers_the_four_clis_with_at_least_25_cases():
    kinds = {c[1].split("_")[0] for c in CASES}
    assert kinds == {"train", "predict", "convert", "benchmark"} and len(CASES) >= 25
