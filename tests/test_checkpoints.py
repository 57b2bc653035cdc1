"""Orbax checkpoints: exact round trip of the train state, keep-last-K, reading a model back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_jax
from vit_jax import checkpoints, sharding, trained
from vit_jax.model import vit
from vit_jax.train import optim
from vit_jax.train import state as train_state

OPTIM = dict(
    name="adamw",
    learning_rate=1e-3,
    kwargs=dict(b1=0.9, b2=0.999, eps=1e-8, mu_dtype="bfloat16"),
    weight_decay=0.1,
    no_decay=r"bias$",
    grad_clip_norm=1.0,
    freeze="^embedding/",  # frozen leaves leave MaskedNodes in the optimizer state
)


@pytest.fixture(scope="module")
def setup():
    model = vit_jax.create_model(
        None,
        hidden_size=32,
        mlp_dim=64,
        num_heads=2,
        num_layers=1,
        patch_size=4,
        image_size=16,
        num_classes=10,
    )
    params = vit.param_shapes(model)
    tx, _ = optim.make_optimizer(OPTIM, {"name": "cosine", "warmup_steps": 2}, params, 10)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    shapes = train_state.state_shapes(model, tx)
    shardings = sharding.tree_shardings(shapes, mesh, fsdp_min_size=2**14)
    state = train_state.init_state(model, tx, shardings, jax.random.key(0))

    # One real update, so Adam's moments are non-zero and the step is not 0.
    @jax.jit  # one compiled update: op-by-op dispatch of the optimizer would be slow
    def update(state):
        grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(jnp.add, state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}

    return model, shapes, shardings, update(state)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_state_round_trip_is_exact_and_keeps_last_k(setup, tmp_path):
    model, shapes, shardings, state = setup
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, state, model.config, {"step": step, "seed": 0})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3

    restored, data_state = ckpt.restore(checkpoints.abstract_with_shardings(shapes, shardings))
    ckpt.close()
    assert data_state == {"step": 3, "seed": 0}
    assert_trees_equal(restored, state)
    mu = jax.tree.leaves(restored["opt_state"], is_leaf=lambda s: hasattr(s, "mu"))
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(mu))


def test_async_save_survives_donated_buffers(setup, tmp_path):
    """The next train step donates the state: the save must not read device buffers later."""
    model, shapes, shardings, state = setup
    copy = jax.tree.map(jnp.copy, state)
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", async_save=True)
    ckpt.save(7, copy, model.config, {"step": 7})
    for leaf in jax.tree.leaves(copy):
        leaf.delete()  # what donation does
    ckpt.wait()
    restored, _ = ckpt.restore(checkpoints.abstract_with_shardings(shapes, shardings))
    ckpt.close()
    assert_trees_equal(restored, state)


def test_read_model_from_workdir_checkpoints_or_step_dir(setup, tmp_path):
    model, _, _, state = setup
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", async_save=False)
    ckpt.save(4, state, model.config, {"step": 4})
    ckpt.save(9, state, model.config, {"step": 9})
    ckpt.close()
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "9"):
        assert trained.find_step_dir(path).name == "9"
        config, params = trained.read_model(path)
        assert config == model.config
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
        assert_trees_equal(params, state["params"])
    assert trained.find_step_dir(tmp_path / "checkpoints" / "4").name == "4"


def test_missing_or_empty_checkpoint_paths_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trained.read_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        trained.read_model(tmp_path)
    assert not trained.is_checkpoint(tmp_path)
    ckpt = checkpoints.TrainCheckpoints(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        ckpt.restore({})
    ckpt.close()


def test_relative_workdirs_work(setup, tmp_path, monkeypatch):
    # `make train` passes workdirs/digits; Orbax itself only accepts absolute local paths.
    model, _, _, state = setup
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoints.TrainCheckpoints("workdirs/run/checkpoints", async_save=True)
    ckpt.save(3, state, model.config, {"step": 3})
    ckpt.close()
    assert (tmp_path / "workdirs" / "run" / "checkpoints" / "3").is_dir()
    config, params = trained.read_model("workdirs/run")
    assert config == model.config
    assert_trees_equal(params, state["params"])
