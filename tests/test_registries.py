"""Every entry of every choice table is wired end to end (see ARCHITECTURE.md, "Where a new X goes").

A name added to a table (model_config.POOLINGS, POSEMBS, REMAT_POLICIES; optim's schedules) must
build, train one step and export, or be refused with a message naming it. Optimizers have theirs in
test_optim.py (every optimizer a recipe names builds and trains), checkpoint formats in
test_convert.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TINY, random_params

import vit_jax
from vit_jax import convert, model_config, optim, train_state, train_step

IMAGES = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
TARGETS = jax.nn.one_hot(jnp.arange(4) % 10, 10)


def _one_sgd_step_lowers_the_loss(model):
    params = random_params(model)
    loss = lambda p: train_step.cross_entropy(model.apply({"params": p}, IMAGES), TARGETS).mean()
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates = jax.tree.map(lambda g: -0.1 * g, grads)  # one SGD step
    after = jax.jit(loss)(optax.apply_updates(params, updates))
    assert float(after) < float(before)
    return params


def _exports_or_says_why_not(model, params, tmp_path, name):
    """Each format round-trips the logits, or refuses naming the option."""
    logits = jax.jit(model.apply)({"params": params}, IMAGES)
    for fmt in sorted(convert.FORMATS):
        path = os.path.join(tmp_path, {"npz": "m.npz", "timm": "m.safetensors"}.get(fmt, fmt))
        try:
            vit_jax.save_pretrained(params, path, format=fmt, model=model)
        except ValueError as e:  # a refusal names what the format cannot hold (not always `name`)
            assert f"format {fmt!r} cannot represent" in str(e), e
            continue
        needed = convert.reload_overrides(params, model.config, fmt)
        reloaded, reloaded_params = vit_jax.load_pretrained(path, **needed)
        np.testing.assert_allclose(
            jax.jit(reloaded.apply)({"params": reloaded_params}, IMAGES), logits, atol=1e-5
        )


@pytest.mark.parametrize("pool", model_config.POOLINGS)
def test_every_pooling_builds_trains_and_exports(pool, tmp_path):
    model = vit_jax.create_model(None, **TINY, num_classes=10, pool=pool)
    if pool == "none":  # every token's logits: not a classifier, so training refuses it by name
        from configs import common

        config = common.get_config()
        config.model = common.model_config(None, pool=pool)
        with pytest.raises(ValueError, match="pool='none'"):
            train_state.model_config_for(config, num_classes=10, num_channels=3)
        params = random_params(model)
    else:
        params = _one_sgd_step_lowers_the_loss(model)
    _exports_or_says_why_not(model, params, tmp_path, f"pool={pool!r}")


@pytest.mark.parametrize("posemb", model_config.POSEMBS)
def test_every_position_embedding_builds_trains_and_exports(posemb, tmp_path):
    model = vit_jax.create_model(
        None, **TINY, num_classes=10, pool="gap", posemb=posemb, posemb_covers_prefix=False
    )
    params = _one_sgd_step_lowers_the_loss(model)
    _exports_or_says_why_not(model, params, tmp_path, "posemb")


@pytest.mark.parametrize("policy", list(model_config.REMAT_POLICIES))
def test_every_remat_policy_gives_the_plain_gradients(policy):
    plain = vit_jax.create_model(None, **TINY, num_classes=10)
    remat = vit_jax.create_model(None, **TINY, num_classes=10, remat_policy=policy)
    params = random_params(plain)

    def grads(model):
        loss = lambda p: train_step.cross_entropy(model.apply({"params": p}, IMAGES), TARGETS)
        return jax.jit(jax.grad(lambda p: loss(p).mean()))(params)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads(remat), grads(plain)
    )


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_every_schedule_warms_up_to_the_peak_and_never_exceeds_it(name):
    schedule = optim.make_schedule({"name": name, "warmup_fraction": 0.1}, 2.0, 100)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == 0.0 and values[10] == pytest.approx(2.0)
    assert np.all(values <= 2.0 + 1e-6) and np.all(np.diff(values[:11]) > 0)
