"""train.py on the command line: overrides, resume by rerunning, clear errors; the recipe configs."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest
from helpers import REPO, subprocess_env

from configs import digits, finetune, pretrain
from vit_jax.train import checks, optim, plan

# The tiny recipe as its docstring gives it (run from the checkout), evaluated on 128-image batches.
TINY = ["--config=configs/digits.py:tiny", "--config.eval_batch_size=128"]


def run_train(*args, timeout=300):
    # The rerun compiles what the first run did: it loads that from the shared compilation cache.
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # two train.py processes: ~15 s warm, ~45 s with a cold compile cache
def test_overrides_reach_the_run_and_rerunning_resumes(digits_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    args = [
        *TINY,
        f"--workdir={workdir}",
        "--config.total_steps=3",
        "--config.optim.learning_rate=0.002",
        f"--config.data_dir={digits_data_dir}",
        "--config.model.dropout_rate=0.1",
        "--config.mesh.fsdp=1",
        "--config.cpu_devices=2",
    ]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| 2 local / 2 global cpu devices |" in first.stdout  # set before JAX started
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


@pytest.mark.slow  # two train.py processes
def test_a_second_run_of_the_same_command_reuses_the_compilation_cache(digits_data_dir, tmp_path):
    cache = tmp_path / "cache"
    args = [
        *TINY,
        "--config.total_steps=2",
        f"--config.data_dir={digits_data_dir}",
        f"--compilation_cache_dir={cache}",
    ]
    first = run_train(*args, f"--workdir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    stored = sorted(p.name for p in cache.iterdir())
    assert len(stored) >= 3  # at least init, the train step and the eval step
    second = run_train(*args, f"--workdir={tmp_path / 'b'}")  # a fresh run: compiles it all again
    assert second.returncode == 0, second.stderr[-3000:]
    # Every program the second run needed was found in the cache: nothing new was stored.
    assert sorted(p.name for p in cache.iterdir()) == stored


def test_unknown_or_malformed_override_is_one_clear_line(tmp_path):
    result = run_train(*TINY, f"--workdir={tmp_path}", "--config.totl_steps=3")
    assert result.returncode != 0
    assert "unknown config key 'totl_steps'" in result.stderr
    assert 'Did you mean "total_steps"' in result.stderr
    assert "Traceback" not in result.stderr

    result = run_train(*TINY, f"--workdir={tmp_path}", "--config.model.hidden_sz=8")
    assert result.returncode != 0 and "unknown config key 'hidden_sz'" in result.stderr

    result = run_train(*TINY, f"--workdir={tmp_path}", "--config.total_steps=many")
    assert result.returncode != 0 and "--config.total_steps=many" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # nothing written


def test_missing_flags_are_reported():
    result = run_train("--workdir=/tmp/unused")
    assert result.returncode != 0 and "--config" in result.stderr


# --- The recipes -------------------------------------------------------------------------------
# Their numbers are the recipes' own business (each docstring cites its source); what our code
# must do is turn every recipe into a model, an optimizer and a schedule that fits its length.

RECIPES = [
    (digits, None),
    (digits, "tiny"),
    *[(pretrain, arg) for arg in ("ViT-B/16,imagenet2012", "ViT-L/16,imagenet21k", None)],
    *[
        (finetune, a)
        for a in ("ViT-B/16,cifar10", "B/32,cifar100", "L/16,oxford_iiit_pet", "B/16,./pics")
    ],
]


@pytest.mark.parametrize(("recipe", "arg"), RECIPES, ids=[f"{r.__name__}:{a}" for r, a in RECIPES])
def test_recipe_builds_its_model_optimizer_and_schedule(recipe, arg):
    config = recipe.get_config(arg) if arg else recipe.get_config()
    model = plan.vit_config_for(config, num_classes=10, num_channels=3)
    assert model.image_size == (config.image_size, config.image_size)
    total = checks.total_steps_of(config, num_train_examples=1_281_167)
    params = {
        "Transformer": {"encoder_norm": {"scale": jnp.ones(2)}},
        "head": {"kernel": jnp.ones(2)},
    }
    _, schedule = optim.make_optimizer(config.optim, config.schedule, params, total)
    warmup = optim.warmup_steps_of(config.schedule, total)
    assert 0 <= warmup < total
    assert float(schedule(warmup)) == pytest.approx(config.optim.learning_rate)  # the peak


def test_finetune_starts_from_the_published_checkpoint_of_its_variant():
    assert (
        finetune.get_config("B/32,cifar100").init_from == "gs://vit_models/imagenet21k/ViT-B_32.npz"
    )


def test_recipes_reject_unknown_datasets():
    with pytest.raises(ValueError, match="allowed"):
        pretrain.get_config("ViT-B/16,jft")
    with pytest.raises(ValueError, match="allowed"):
        finetune.get_config("ViT-B/16,mnist")
    with pytest.raises(ValueError, match="unknown variant"):
        finetune.get_config("ViT-Q/16,cifar10")
    with pytest.raises(ValueError, match="allowed"):
        digits.get_config("huge")


def test_none_on_the_command_line_turns_a_tuple_field_off():
    # ml_collections hands a tuple field's "None" over as (None,); the recipes mean None by it.
    from absl import flags
    from ml_collections.config_flags import config_flags

    from vit_jax.tools import train as train_cli

    argv = [
        "train.py",
        f"--config={REPO / 'configs/pretrain.py'}:ViT-Ti/4,imagenet2012",
        "--config.pp.crop_area_range=None",
        "--config.pp.crop_aspect_range=(0.5,2.0)",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    overridden = set(config_flags.get_override_values(flag_values["config"]))
    assert config.pp.crop_area_range == (None,)  # what ml_collections gives
    train_cli.none_for_tuple_overrides(config, overridden)
    assert config.pp.crop_area_range is None
    assert tuple(config.pp.crop_aspect_range) == (0.5, 2.0)  # real tuples stay as they are
