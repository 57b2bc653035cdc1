"""Checkpoint integrity: every saved array carries a fingerprint that sees a single changed word;
a damaged newest checkpoint (truncated arrays, a missing manifest, metadata or state, a garbled
fingerprint) is moved aside with one warning and the run resumes from the previous intact one;
leftovers of an interrupted save are removed; `keep` never drops the newest; the NaN message names
the newest checkpoint, not a "last good" one.
"""

import glob
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoints, integrity
from vit_jax.model.config import ViTConfig
from vit_jax.train import loss_watch


def _state(value):
    return {
        "params": {"w": jnp.full((64, 8), value, jnp.float32), "b": jnp.arange(8.0) * value},
        "opt_state": ({"mu": jnp.full((64, 8), value / 2, jnp.bfloat16)},),
        "step": jnp.asarray(int(value), jnp.int32),
    }


def _damage(step_dir: pathlib.Path, how: str):
    state = step_dir / "state"
    if how == "truncate_arrays":
        for path in glob.glob(str(state / "**" / "d" / "*"), recursive=True):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "delete_manifest":
        for path in glob.glob(str(state / "**" / "manifest.ocdbt"), recursive=True):
            os.remove(path)
    elif how == "delete_metadata":
        os.remove(state / "_METADATA")
    elif how == "delete_state":
        shutil.rmtree(state)
    elif how == "garble_fingerprint":  # what garbled bytes that load silently look like
        record = step_dir / "integrity" / "metadata"
        data = json.loads(record.read_text())
        key = sorted(data["arrays"])[0]
        data["arrays"][key] = "deadbeef"
        record.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "how",
    [
        "truncate_arrays",
        "delete_manifest",
        "delete_metadata",
        "delete_state",
        "garble_fingerprint",
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(how, tmp_path):
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), ViTConfig(), {"step": step})
    ckpt.wait()
    _damage(tmp_path / "checkpoints" / "2", how)
    ckpt.close()

    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=3, async_save=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
    warnings = []
    state, data_state = ckpt.restore_newest_intact(abstract, warn=warnings.append)
    assert data_state["step"] == 1 and int(state["step"]) == 1
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert len(warnings) == 1 and "checkpoint step 2" in warnings[0] and "damaged" in warnings[0]
    assert (tmp_path / checkpoints.DAMAGED_DIR / "2").is_dir()  # moved aside, not deleted
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_fingerprint_sees_a_single_changed_word():
    fingerprint = integrity.make_fingerprint()
    tree = {"a": jnp.arange(1000, dtype=jnp.float32), "b": jnp.ones((3, 5), jnp.bfloat16)}
    changed = {**tree, "a": tree["a"].at[637].set(637.0001)}
    swapped = {**tree, "a": tree["a"][::-1]}
    base = fingerprint(tree)
    assert fingerprint(tree) == base
    assert fingerprint(changed)["['a']"] != base["['a']"]
    assert fingerprint(swapped)["['a']"] != base["['a']"]  # position matters, not just content
    with pytest.raises(integrity.FingerprintMismatchError, match="'a'"):
        integrity.verify(fingerprint(changed), base)


def test_interrupted_save_leftovers_are_removed_and_keep_never_drops_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "7.orbax-checkpoint-tmp-1234").mkdir(parents=True)
    ckpt = checkpoints.TrainCheckpoints(root, keep=1, async_save=False)
    assert not (root / "7.orbax-checkpoint-tmp-1234").exists()
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), ViTConfig(), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    ckpt.close()
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        checkpoints.TrainCheckpoints(root, keep=0)


def test_nan_message_names_the_newest_checkpoint_not_a_last_good_one(tmp_path):
    watch = loss_watch.LossWatch(tmp_path, latest_saved=4)
    watch.add(5, jnp.asarray(float("nan")))
    with pytest.raises(loss_watch.NonFiniteLossError) as e:
        watch.check()
    assert "the newest checkpoint is step 4" in str(e.value) and "last good" not in str(e.value)
