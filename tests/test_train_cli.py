"""train.py on the command line: overrides, resume by rerunning, clear errors; the recipe configs."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import pytest

from configs import common, finetune, pretrain
from vit_jax import train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_CONFIG = """
from configs import common

def get_config(arg=None):
    config = common.get_config()
    config.model = common.model_config(
        None, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, patch_size=(4, 4)
    )
    config.dataset = "digits"
    config.image_size = 16
    config.batch_size = 32
    config.eval_batch_size = 128
    config.total_steps = 100  # overridden on the command line
    config.log_every_steps = 1
    config.checkpoint_every_steps = 0
    config.pp.crop_area_range = None
    config.schedule.warmup_steps = 0
    return config
"""


def run_train(*args, timeout=300):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # The rerun compiles what the first run did: let it load that from JAX's persistent cache.
        "JAX_COMPILATION_CACHE_DIR": os.path.join(
            tempfile.gettempdir(), f"vit_jax_test_compile_cache_{os.getuid()}"
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(TINY_CONFIG))
    return str(path)


@pytest.mark.slow  # two train.py processes: ~15 s warm, ~45 s with a cold compile cache
def test_overrides_reach_the_run_and_rerunning_resumes(tiny_config_file, digits_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        f"--config={tiny_config_file}",
        f"--workdir={workdir}",
        "--config.total_steps=3",
        "--config.optim.learning_rate=0.002",
        f"--config.data_dir={digits_data_dir}",
        "--config.model.dropout_rate=0.1",
        "--config.mesh.fsdp=1",
    ]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    assert "step 3/3" in first.stdout and "step 4/" not in first.stdout
    assert lines[-1].startswith("Final test accuracy: ") and lines[-1].endswith("(360 examples)")
    saved = json.loads(pathlib.Path(workdir, "config.json").read_text())
    assert saved["total_steps"] == 3
    assert saved["optim"]["learning_rate"] == 0.002
    assert saved["model"]["dropout_rate"] == 0.1
    first_record = json.loads(pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()[0])
    assert first_record["lr"] == pytest.approx(
        0.002
    )  # no warmup: the override is the first step's lr

    again = run_train(*args)  # the same command: nothing left to train, evaluates the checkpoint
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from the checkpoint of step 3" in again.stdout
    assert "step 1/3" not in again.stdout
    assert again.stdout.strip().splitlines()[-1] == lines[-1]


def test_unknown_or_malformed_override_is_one_clear_line(tiny_config_file, tmp_path):
    result = run_train(
        f"--config={tiny_config_file}", f"--workdir={tmp_path}", "--config.totl_steps=3"
    )
    assert result.returncode != 0
    assert "unknown config key 'totl_steps'" in result.stderr
    assert 'Did you mean "total_steps"' in result.stderr
    assert "Traceback" not in result.stderr

    result = run_train(
        f"--config={tiny_config_file}", f"--workdir={tmp_path}", "--config.model.hidden_sz=8"
    )
    assert result.returncode != 0 and "unknown config key 'hidden_sz'" in result.stderr

    result = run_train(
        f"--config={tiny_config_file}", f"--workdir={tmp_path}", "--config.total_steps=many"
    )
    assert result.returncode != 0 and "--config.total_steps=many" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path) or os.listdir(tmp_path) == ["tiny.py"]  # nothing written


def test_missing_flags_are_reported():
    result = run_train("--workdir=/tmp/unused")
    assert result.returncode != 0 and "--config" in result.stderr


# --- The recipes -------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["ViT-B/16,imagenet2012", "ViT-L/16,imagenet21k", None])
def test_pretrain_recipe(arg):
    config = pretrain.get_config(arg)
    model = train_state.model_config_for(config, num_classes=21843, num_channels=3)
    assert config.optim.name == "adamw" and config.optim.learning_rate == 1e-3
    assert (config.optim.b1, config.optim.b2) == (0.9, 0.999)
    assert config.batch_size == 4096 and config.schedule.warmup_steps == 10_000
    assert config.optim.no_decay == common.NO_DECAY
    assert model.representation_size == model.hidden_size and model.dropout_rate == 0.1
    if arg and "21k" in arg:
        assert model.head_bias_init == -10.0 and config.loss == "sigmoid_xent"
        assert model.hidden_size == 1024


@pytest.mark.parametrize(
    "arg", ["ViT-B/16,cifar10", "ViT-B/32,cifar100", "ViT-L/16,oxford_iiit_pet", "B/16,./pics"]
)
def test_finetune_recipe(arg):
    config = finetune.get_config(arg)
    model = train_state.model_config_for(config, num_classes=10, num_channels=3)
    assert config.optim.name == "momentum" and config.optim.momentum == 0.9
    assert config.optim.weight_decay == 0.0 and config.optim.grad_clip_norm == 1.0
    assert config.batch_size == 512 and config.image_size == 384
    assert config.schedule.name == "cosine" and 0 < config.schedule.warmup_steps <= 500
    assert model.representation_size is None and model.image_size == (384, 384)
    assert config.init_from.startswith("gs://vit_models/imagenet21k/ViT-")
    assert config.init_from.endswith(("B_16.npz", "B_32.npz", "L_16.npz"))


def test_recipes_reject_unknown_datasets():
    with pytest.raises(ValueError, match="allowed"):
        pretrain.get_config("ViT-B/16,jft")
    with pytest.raises(ValueError, match="allowed"):
        finetune.get_config("ViT-B/16,mnist")
    with pytest.raises(ValueError, match="unknown variant"):
        finetune.get_config("ViT-Q/16,cifar10")
