"""Few-shot evaluation inside the training loop (`config.fewshot`, vit_jax/train/fewshot_loop.py).

A real `train.py` run logs 'fewshot' records; each equals what `vit_jax.train.fewshot` gives on
the features of the checkpoint of that step, computed here independently (the splits read by the
few-shot command line's reader, the features by `fewshot.extract_features`, one example at a time
apart from the loop's padded, sharded batches). Shots larger than a class and bad field values are
one clear error before any training compute. That few-shot evaluation changes nothing a run
trains is in tests/test_harmless_fields.py (`fewshot.` is a harmless field).
"""

import json
import re

import ml_collections
import numpy as np
import pytest
from helpers import TINY_CONFIG, tiny_recipe, train_py
from test_bad_input import run_cli  # noqa: F401  (the fixture: a CLI's main in-process)
from test_stop_signals import signal_after_step

from configs import common
from vit_jax import trained
from vit_jax.model.vit import VisionTransformer
from vit_jax.tools import fewshot as fewshot_cli
from vit_jax.train import checks, fewshot, fewshot_loop, trainer

STEPS = 10
SHOTS = (1, 5)
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory, digits_data_dir):
    """train.py of the tiny recipe with few-shot every 5 steps and checkpoints at 5 and 10."""
    work = tmp_path_factory.mktemp("fewshot_run") / "w"
    cmd = train_py(
        TINY_CONFIG,
        work,
        digits_data_dir,
        f"--config.total_steps={STEPS}",
        "--config.checkpoint_every_steps=5",
        "--config.fewshot.every_steps=5",
        f"--config.fewshot.shots={SHOTS}",
        f"--config.fewshot.seeds={SEEDS}",
    )
    status, out, err = signal_after_step(cmd, [], step=STEPS)
    assert status == 0, err[-3000:]
    return work, out


def _independent_accuracies(step_dir, data_dir) -> dict[str, float]:
    config, params = trained.read_model(step_dir)
    model = VisionTransformer(config)
    splits = [
        fewshot_cli.read_split("digits", split, config, data_dir, batch_size=97)
        for split in ("train", "test")
    ]
    (train_x, train_y, classes), (test_x, test_y, _) = splits
    features = [
        fewshot.extract_features(model, params, x, batch_size=97) for x in (train_x, test_x)
    ]
    results = fewshot.evaluate(
        features[0], train_y, features[1], test_y, shots=SHOTS, seeds=SEEDS, num_classes=classes
    )
    return {fewshot_loop.metric_name("digits", r.shots): r.accuracy for r in results}


def test_fewshot_records_equal_the_ridge_reference_on_the_checkpoint(fewshot_run, digits_data_dir):
    work, out = fewshot_run
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if r["split"] == "fewshot"}
    assert sorted(logged) == [5, 10]
    for step, record in logged.items():
        expected = _independent_accuracies(work / "checkpoints" / str(step), digits_data_dir)
        assert {k: record[k] for k in expected} == pytest.approx(expected, abs=1e-12), step
        assert all(0.0 <= v <= 1.0 for v in expected.values())
        shown = " | ".join(f"{k}-shot {100 * record[f'digits_{k}shot']:.2f}%" for k in SHOTS)
        assert f"few-shot at step {step}: digits {shown} (" in out


def test_shots_larger_than_a_class_are_refused_before_training(digits_data_dir, tmp_path):
    config = tiny_recipe()
    config.data_dir = digits_data_dir
    config.fewshot.every_steps, config.fewshot.shots = 5, (5, 1000)
    work = tmp_path / "w"
    with pytest.raises(ValueError) as refused:
        trainer.train_and_evaluate(config, str(work))
    message = str(refused.value)
    assert message.startswith("config.fewshot.shots=(5, 1000) is invalid: 'digits' train")
    labels = np.concatenate(
        [b["label"].argmax(-1) for b in _train_split_batches(config)]
    )  # the smallest class, derived
    smallest = fewshot.min_class_size(labels, 10)
    assert f"has a class of only {smallest} examples; allowed: shots up to {smallest}" in message
    assert not work.exists()  # refused before the workdir was claimed


def _train_split_batches(config):
    from vit_jax import data as data_lib

    split = ml_collections.ConfigDict(config.to_dict())
    split.eval_split = "train"
    data = data_lib.get_datasets(split)
    for batch in data.eval_iter():
        real = np.asarray(batch["mask"]) > 0
        yield {"label": np.asarray(batch["label"])[real]}


def test_shots_larger_than_a_class_on_the_command_line_are_one_fatal_line(
    run_cli,  # noqa: F811
    tiny_config_path,
    digits_data_dir,
    tmp_path,
):
    fresh = tmp_path / "fresh"
    args = [
        f"--config={tiny_config_path}",
        f"--workdir={fresh}",
        f"--config.data_dir={digits_data_dir}",
        "--config.fewshot.every_steps=2",
        "--config.fewshot.shots=(1000,)",
    ]
    code, out, err = run_cli("train", args)
    fatal = [line for line in err.splitlines() if line.startswith("FATAL")]
    assert code == 1 and len(fatal) == 1 and err.strip() == fatal[0], err
    assert "config.fewshot.shots=(1000,)" in fatal[0] and "shots up to" in fatal[0]
    assert not fresh.exists()


def _fewshot(**fields):
    settings = ml_collections.ConfigDict(common.get_config().fewshot.to_dict(), type_safe=False)
    for key, value in fields.items():
        settings[key] = value
    return settings


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"every_steps": -1}, "fewshot.every_steps=-1"),
        ({"every_steps": 2.5}, "fewshot.every_steps=2.5"),
        ({"shots": (0, 5)}, "fewshot.shots=(0, 5)"),
        ({"shots": ()}, "fewshot.shots=()"),
        ({"shots": (1.5,)}, "fewshot.shots=(1.5,)"),
        ({"seeds": (-1,)}, "fewshot.seeds=(-1,)"),
        ({"seeds": ()}, "fewshot.seeds=()"),
        ({"datasets": "digits"}, "fewshot.datasets='digits'"),
        ({"datasets": ("",)}, "fewshot.datasets=('',)"),
    ],
)
def test_bad_fewshot_fields_are_one_clear_error(fields, named):
    with pytest.raises(ValueError, match="^" + re.escape(f"config.{named} is invalid: ")):
        checks.check_fewshot(_fewshot(**fields))


def test_the_defaults_are_valid_and_off():
    settings = common.get_config().fewshot
    checks.check_fewshot(settings)  # no error
    assert settings.every_steps == 0
    config = tiny_recipe()
    assert fewshot_loop.prepare(config, None, None, None) is None  # off: nothing is read
