"""What cannot be exact is recorded, and reading a trained model falls back like a restore does.

Numerics: every checkpoint's integrity record holds the run's numerics fingerprint (versions,
devices, CPU features, core count, XLA_FLAGS, thread settings); resuming from a step written on
another one logs one WARNING naming what differs; a checkpoint written before fingerprints existed
resumes silently.

Reading (`predict`, `config.init_from`, `load_pretrained` on a workdir): a damaged newest step is
named in one WARNING and the newest intact one is read; nothing in the workdir is changed.
"""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints, integrity, trained
from vit_jax.interop import load
from vit_jax.model.config import ViTConfig


def _state(value):
    return {
        "params": {"w": jnp.full((16, 4), value, jnp.float32), "b": jnp.arange(4.0) * value},
        "opt_state": ({"mu": jnp.full((16, 4), value / 2, jnp.float32)},),
        "step": jnp.asarray(int(value), jnp.int32),
    }


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _save(directory, steps, config=None):
    ckpt = checkpoints.TrainCheckpoints(directory, keep=5, async_save=False)
    for step in steps:
        ckpt.save(step, _state(step), config or ViTConfig(), {"step": step})
    ckpt.wait()
    ckpt.close()


def _edit_record(step_dir: pathlib.Path, edit):
    path = step_dir / "integrity" / "metadata"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _restore(directory):
    warnings = []
    ckpt = checkpoints.TrainCheckpoints(directory, keep=5, async_save=False)
    state, _ = ckpt.restore_newest_intact(_abstract(), warn=warnings.append)
    ckpt.close()
    return state, warnings


def test_each_checkpoint_records_the_numerics_fingerprint_of_its_machine(tmp_path):
    _save(tmp_path / "checkpoints", [1])
    record = json.loads((tmp_path / "checkpoints" / "1" / "integrity" / "metadata").read_text())
    numerics = record["numerics"]
    assert numerics == integrity.numerics_fingerprint()
    assert numerics["jax"] == jax.__version__ and numerics["backend"] == jax.default_backend()
    assert numerics["device_count"] == jax.device_count()
    assert numerics["device_kind"] == jax.devices()[0].device_kind
    for key in ("jaxlib", "xla_extension", "cpu_features", "cpu_count", "XLA_FLAGS"):
        assert key in numerics


def test_a_resume_on_another_fingerprint_warns_once_naming_what_differs(tmp_path):
    _save(tmp_path / "checkpoints", [1, 2])
    here = integrity.numerics_fingerprint()

    def other_machine(record):
        features = record["numerics"]["cpu_features"].split()
        record["numerics"]["cpu_features"] = " ".join([*features[1:], "avx512_test"])
        record["numerics"]["cpu_count"] = here["cpu_count"] + 62

    _edit_record(tmp_path / "checkpoints" / "2", other_machine)
    state, warnings = _restore(tmp_path / "checkpoints")
    assert int(state["step"]) == 2  # the step is intact: it is used, with a warning
    assert len(warnings) == 1 and warnings[0].startswith("WARNING"), warnings
    assert "checkpoint step 2" in warnings[0] and "numerics fingerprint" in warnings[0]
    removed = here["cpu_features"].split()[:1]
    assert "avx512_test at save time only" in warnings[0]
    assert f"{' '.join(removed)} here only" in warnings[0]
    assert f"cpu_count: {here['cpu_count'] + 62} → {here['cpu_count']}" in warnings[0]
    assert "jax" not in warnings[0].replace("jax_", "")  # only what differs is named


def test_the_same_fingerprint_and_old_checkpoints_without_one_resume_silently(tmp_path):
    _save(tmp_path / "same" / "checkpoints", [1])
    state, warnings = _restore(tmp_path / "same" / "checkpoints")
    assert int(state["step"]) == 1 and warnings == []

    _save(tmp_path / "old" / "checkpoints", [1])
    _edit_record(tmp_path / "old" / "checkpoints" / "1", lambda r: r.pop("numerics"))
    state, warnings = _restore(tmp_path / "old" / "checkpoints")
    assert int(state["step"]) == 1 and warnings == []


def test_numerics_differences_names_each_changed_entry():
    saved = {"jax": "0.10.1", "cpu_features": "avx avx2", "XLA_FLAGS": ""}
    now = {"jax": "0.10.2", "cpu_features": "avx avx512f", "XLA_FLAGS": ""}
    assert integrity.numerics_differences(saved, now) == [
        "cpu_features: avx2 at save time only, avx512f here only",
        "jax: '0.10.1' → '0.10.2'",
    ]
    assert integrity.numerics_differences(None, now) == []


# --- reading a trained model: the newest intact step -------------------------------------------


def _truncate_arrays(step_dir: pathlib.Path):
    for path in (step_dir / "state").rglob("d/*"):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)


def _garble_params_fingerprint(step_dir: pathlib.Path):
    def garble(record):
        key = next(k for k in sorted(record["arrays"]) if k.startswith("['params']"))
        record["arrays"][key] = "deadbeef"

    _edit_record(step_dir, garble)


DAMAGES = {
    "truncated_arrays": _truncate_arrays,
    "garbled_fingerprint": _garble_params_fingerprint,  # bytes that load silently, but wrong
    "deleted_state": lambda d: shutil.rmtree(d / "state"),
    "deleted_model_config": lambda d: shutil.rmtree(d / "model_config"),
}


@pytest.fixture
def snapshot():
    def take(root: pathlib.Path):
        return sorted(
            (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()
        )

    return take


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_reading_a_workdir_skips_a_damaged_newest_step_with_one_warning(
    how, tmp_path, caplog, snapshot
):
    config = ViTConfig(num_classes=4, hidden_size=16, num_heads=4)
    _save(tmp_path / "checkpoints", [3, 6], config)
    DAMAGES[how](tmp_path / "checkpoints" / "6")
    before = snapshot(tmp_path)
    for path in (tmp_path, tmp_path / "checkpoints"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vit_jax"):
            read_config, params, _, step_dir = trained.read_trained(path)
        assert step_dir.name == "3" and read_config == config
        np.testing.assert_array_equal(params["w"], np.asarray(_state(3)["params"]["w"]))
        warnings = [r.getMessage() for r in caplog.records if r.name == "vit_jax"]
        assert len(warnings) == 1, warnings
        assert "checkpoint step 6" in warnings[0] and "damaged" in warnings[0]
    assert snapshot(tmp_path) == before  # reading moves and changes nothing


def test_a_damaged_step_named_exactly_or_a_wholly_damaged_workdir_is_one_clear_error(tmp_path):
    _save(tmp_path / "checkpoints", [3, 6])
    _truncate_arrays(tmp_path / "checkpoints" / "6")
    with pytest.raises(checkpoints.DamagedCheckpointError, match="checkpoint .*6 is damaged"):
        trained.read_model(tmp_path / "checkpoints" / "6")
    _garble_params_fingerprint(tmp_path / "checkpoints" / "3")
    with pytest.raises(checkpoints.DamagedCheckpointError, match=r"every checkpoint .*\[6, 3\]"):
        trained.read_model(tmp_path)


def test_predict_init_from_and_load_pretrained_read_the_newest_intact_step(tmp_path, caplog):
    # All three go through load.load_checkpoint; init_from through train.state.load_init_params.
    from helpers import TINY, random_params

    from vit_jax.interop.input_convention import DEFAULT
    from vit_jax.model.vit import VisionTransformer
    from vit_jax.train import state as state_lib

    config = ViTConfig(num_classes=3, **TINY)
    model = VisionTransformer(config)
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=5, async_save=False)
    by_step = {step: random_params(model, seed=step) for step in (3, 6)}
    for step, params in by_step.items():
        state = {"params": params, "opt_state": (), "step": jnp.asarray(step, jnp.int32)}
        ckpt.save(step, state, config, {"step": step}, DEFAULT.to_dict())
    ckpt.close()
    _garble_params_fingerprint(tmp_path / "checkpoints" / "6")
    expected = jax.tree.leaves(by_step[3])
    for read in (
        lambda: load.load_checkpoint(str(tmp_path)).params,  # predict, vit_jax.load_pretrained
        lambda: state_lib.load_init_params(str(tmp_path), config),  # config.init_from
    ):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vit_jax"):
            params = read()
        for got, want in zip(jax.tree.leaves(params), expected, strict=True):
            np.testing.assert_array_equal(got, np.asarray(want))
        warnings = [r.getMessage() for r in caplog.records if r.name == "vit_jax"]
        assert len(warnings) == 1 and "checkpoint step 6" in warnings[0], warnings
