"""The fields a resumed run may change (`workdir.HARMLESS`, the one list) change nothing it trains.

Every HARMLESS field is changed in at least one run here or in tests/test_stop_signals.py's chain
(stopped by SIGINT / SIGTERM / SIGKILL at random steps, each leg resumed with other fields, on the
on-device digits path) and checked against the list; each run's final params and per-step losses
equal its reference run's bit for bit. Here: host batches (the tf.data path's contract), 1 vs 8
steps per dispatch with checkpoints every 0 / 5 / 7 steps, a log line every step or every 50. (One
compiled program runs every step, whatever the grouping: `train_step.make_multi_step`.) The
ROUNDING fields are accepted on resume with a WARNING instead.
"""

import json

import pytest
import test_stop_signals
from helpers import assert_params_identical
from test_trainer import FakeData, tiny_config

from vit_jax import trained
from vit_jax.train import trainer, workdir

STEPS = 20
REFERENCE = {
    "steps_per_dispatch": 1,
    "log_every_steps": 50,
    "eval_every_steps": 0,
    "checkpoint_every_steps": 0,
}
# Host batches (FakeData): the reference config with these changed.
HOST_VARIANTS = {
    "8, checkpoint every 5, log every step, keep 1, sync saves": {
        "steps_per_dispatch": 8,
        "checkpoint_every_steps": 5,
        "log_every_steps": 1,
        "keep_checkpoints": 1,
        "async_checkpoints": False,
    },
    "8, checkpoint every 7, eval every 5, no prefetch, eval batch 8": {
        "steps_per_dispatch": 8,
        "checkpoint_every_steps": 7,
        "eval_every_steps": 5,
        "prefetch_to_device": 0,
        "eval_batch_size": 8,
    },
}


# Few-shot evaluation every 5 steps (`fewshot.`): the shots and test images are digits' own (the
# real TFDS data), the training batches the host's.
FEWSHOT_VARIANT = {"fewshot.every_steps": 5, "fewshot.shots": (1, 2)}


def _with(config, fields):
    for key, value in fields.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def _host_config(fields=()):
    config = tiny_config(total_steps=STEPS, **REFERENCE)
    config.model.dropout_rate = 0.1  # every step draws its own masks, in any dispatch
    return _with(config, dict(fields))


def _params(workdir_path):
    return trained.read_model(str(workdir_path))[1]


def test_every_harmless_field_is_changed_by_a_run_here():
    changed = set()  # the real-process stop / resume chain changes the rest
    for fields in [*HOST_VARIANTS.values(), *test_stop_signals.LEGS, FEWSHOT_VARIANT]:
        # a nested field counts for the prefix that lists it ('fewshot.every_steps': 'fewshot.')
        changed |= {
            next((f for f in workdir.HARMLESS if workdir._listed(k, (f,))), k) for k in fields
        }
    assert set(workdir.HARMLESS) <= changed, set(workdir.HARMLESS) - changed


@pytest.fixture(scope="module")
def host_reference(tmp_path_factory):
    config = _host_config()
    path = tmp_path_factory.mktemp("harmless") / "reference"
    return path, trainer.train_and_evaluate(config, str(path), data=FakeData(config))


@pytest.mark.parametrize("name", list(HOST_VARIANTS))
def test_host_batches_change_nothing(host_reference, tmp_path, name):
    ref_path, ref = host_reference
    config = _host_config(HOST_VARIANTS[name])
    result = trainer.train_and_evaluate(config, str(tmp_path / "w"), data=FakeData(config))
    assert result["train_losses"] == ref["train_losses"]  # every step, exactly
    assert_params_identical(_params(tmp_path / "w"), _params(ref_path))
    assert result["eval"]["top1"] == ref["eval"]["top1"]
    # eval_batch_size groups the eval sums otherwise: the loss may round differently, only that
    assert result["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-6)


def test_fewshot_evaluation_changes_nothing(host_reference, tmp_path, digits_data_dir):
    ref_path, ref = host_reference
    config = _host_config(FEWSHOT_VARIANT)
    config.data_dir = digits_data_dir
    result = trainer.train_and_evaluate(config, str(tmp_path / "w"), data=FakeData(config))
    assert result["train_losses"] == ref["train_losses"]
    assert_params_identical(_params(tmp_path / "w"), _params(ref_path))
    assert result["eval"] == ref["eval"]
    records = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "fewshot"] == [5, 10, 15, 20]


def test_rounding_fields_are_accepted_on_resume_and_named():
    old = {"seed": 0, "accum_steps": 1, "mesh": {"data": -1}, "log_every_steps": 10}
    new = {**old, "accum_steps": 2, "mesh": {"data": 2}, "log_every_steps": 5}
    assert workdir.config_differences(old, new) == []
    assert workdir.rounding_differences(old, new) == ["accum_steps 1 → 2", "mesh.data -1 → 2"]
    assert not set(workdir.HARMLESS) & set(workdir.ROUNDING)
