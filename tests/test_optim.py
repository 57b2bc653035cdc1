"""Optimizer and schedule from config: values at known steps, masks, multipliers, freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vit_jax
from vit_jax.model import vit
from vit_jax.train import optim

OPTIM = dict(
    name="adamw",
    learning_rate=0.1,
    kwargs={},
    weight_decay=0.0,
    no_decay=r"(^|/)(bias|scale|pos_embedding|cls)$",
    grad_clip_norm=0.0,
    lr_mults=(),
    freeze="",
)
CONSTANT = dict(name="constant", warmup_steps=0)


@pytest.fixture(scope="module")
def vit_params():
    model = vit_jax.create_model(
        None, hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, patch_size=4, image_size=8
    )
    return vit.param_shapes(model)


def schedule_values(steps, total=100, **schedule):
    fn = optim.make_schedule({"warmup_steps": 0, **schedule}, 1.0, total)
    return [float(fn(s)) for s in steps]


def test_warmup_then_cosine_at_known_steps():
    values = schedule_values([0, 5, 10, 55, 100, 150], name="cosine", warmup_steps=10)
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_cosine_and_linear_end_at_the_end_fraction():
    cosine = schedule_values([0, 50, 100], name="cosine", end_lr_fraction=0.1)
    np.testing.assert_allclose(cosine, [1.0, 0.55, 0.1], atol=1e-6)
    linear = schedule_values([0, 25, 100], name="linear", end_lr_fraction=0.2)
    np.testing.assert_allclose(linear, [1.0, 0.8, 0.2], atol=1e-6)


def test_rsqrt_and_constant_with_cooldown():
    rsqrt = schedule_values(
        [10, 50, 90, 100], name="rsqrt", warmup_steps=10, rsqrt_timescale=100, cooldown_steps=20
    )
    # 40 and 80 steps after warmup; step 90 is also halfway through the 20-step cooldown.
    expected = [1.0, math.sqrt(100 / 140), math.sqrt(100 / 180) * 0.5, 0.0]
    np.testing.assert_allclose(rsqrt, expected, atol=1e-6)
    constant = schedule_values([0, 50, 80, 90, 100], total=100, name="constant", cooldown_steps=20)
    np.testing.assert_allclose(constant, [1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_rsqrt_without_cooldown_keeps_decaying():
    (value,) = schedule_values([10 + 300], total=1000, name="rsqrt", warmup_steps=10)
    np.testing.assert_allclose(value, math.sqrt(10_000 / 10_300), rtol=1e-6)


def test_bad_schedule_and_optimizer_names_list_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed.*cosine"):
        optim.make_schedule({"name": "exp", "warmup_steps": 0}, 1.0, 10)
    with pytest.raises(ValueError, match="warmup_steps=20"):
        optim.make_schedule({"name": "cosine", "warmup_steps": 20}, 1.0, 10)
    with pytest.raises(ValueError, match="'adamw_typo' is not an optax optimizer; allowed"):
        optim.make_optimizer({**OPTIM, "name": "adamw_typo"}, CONSTANT, {"w": jnp.ones(2)}, 10)
    with pytest.raises(ValueError, match="'tree_map' is not an optax optimizer"):
        optim.make_optimizer({**OPTIM, "name": "tree_map"}, CONSTANT, {"w": jnp.ones(2)}, 10)
    with pytest.raises(ValueError, match="not a valid regex"):
        optim.make_optimizer({**OPTIM, "freeze": "("}, CONSTANT, {"w": jnp.ones(2)}, 10)


def test_default_no_decay_spares_biases_norms_posemb_and_cls(vit_params):
    from configs import common

    mask = optim.decay_mask(vit_params, common.NO_DECAY)
    flat = {optim.param_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    assert flat["embedding/kernel"] and flat["head/kernel"]
    for spared in (
        "cls",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoderblock_0/LayerNorm_0/scale",
        "Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias",
        "Transformer/encoder_norm/bias",
        "head/bias",
    ):
        assert not flat[spared], spared


def one_update(optim_config, params, grads, schedule=CONSTANT, steps=1):
    tx, _ = optim.make_optimizer(optim_config, schedule, params, 100)
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grads, state, params)
    return updates, state


def test_adamw_decay_is_decoupled_and_masked():
    params = {"dense": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = one_update({**OPTIM, "weight_decay": 0.5}, params, zero_grads)
    # Adam's direction is 0 for a zero gradient; the decay is -lr * wd * param, bias spared.
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


def test_sgd_momentum_and_l2_decay():
    params = {"w": jnp.array([1.0])}
    grads = {"w": jnp.array([2.0])}
    sgd = {**OPTIM, "name": "sgd", "weight_decay": 0.5, "no_decay": ""}
    updates, _ = one_update(sgd, params, grads)
    np.testing.assert_allclose(updates["w"], -0.1 * (2.0 + 0.5 * 1.0))
    momentum = {**OPTIM, "name": "sgd", "kwargs": {"momentum": 0.9}}
    updates, _ = one_update(momentum, params, grads, steps=2)  # second step: g + 0.9 g
    np.testing.assert_allclose(updates["w"], -0.1 * 1.9 * 2.0, rtol=1e-6)


def test_clip_lr_mults_and_freeze():
    params = {"head": {"kernel": jnp.ones((2,))}, "embedding": {"kernel": jnp.ones((1,))}}
    grads = {
        "head": {"kernel": jnp.full((2,), 30.0)},
        "embedding": {"kernel": jnp.full((1,), 40.0)},
    }
    config = {**OPTIM, "name": "sgd", "grad_clip_norm": 1.0}
    updates, _ = one_update(config, params, grads)
    # Global norm sqrt(2·30² + 40²) = 10·sqrt(34), clipped to 1.
    norm = 10 * math.sqrt(34)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 30 / norm, rtol=1e-5)
    config["lr_mults"] = (("^head/", 10.0),)
    updates, _ = one_update(config, params, grads)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 10 * 30 / norm, rtol=1e-5)
    np.testing.assert_allclose(updates["embedding"]["kernel"], -0.1 * 40 / norm, rtol=1e-5)

    frozen = {**OPTIM, "freeze": "^embedding/", "grad_clip_norm": 1.0}
    updates, state = one_update(frozen, params, grads)
    np.testing.assert_array_equal(updates["embedding"]["kernel"], 0.0)
    assert np.all(np.asarray(updates["head"]["kernel"]) < 0)
    # Frozen parameters hold no Adam moments.
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (2,)]
    assert len(moments) == 2  # mu and nu of head/kernel only
    with pytest.raises(ValueError, match="freezes every parameter"):
        one_update({**OPTIM, "freeze": "."}, params, grads)


def test_bfloat16_first_moment():
    params = {"w": jnp.ones((3,))}
    config = {**OPTIM, "kwargs": {"mu_dtype": "bfloat16"}}
    _, state = one_update(config, params, {"w": jnp.ones((3,))})
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")))
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32


def _recipe_optimizers() -> list[tuple[str, dict]]:
    """(name, optim config) of every recipe in configs/, with each config's own kwargs."""
    from configs import common, digits, finetune, pretrain

    configs = [common.get_config(), digits.get_config()]
    configs += [finetune.get_config(f"ViT-B/16,{d}") for d in finetune.DATASETS]
    configs += [pretrain.get_config(f"ViT-B/16,{d}") for d in pretrain.DATASETS]
    return [(c.optim.name, c.optim.to_dict()) for c in configs]


# Every optimizer a recipe names, and others optax has, to show a new one is a config change.
OPTIMIZERS_IN_USE = _recipe_optimizers() + [
    (name, {**OPTIM, "name": name}) for name in ("adam", "lion", "nadamw", "adafactor", "rmsprop")
]


@pytest.mark.parametrize(
    ("name", "config"), OPTIMIZERS_IN_USE, ids=[n for n, _ in OPTIMIZERS_IN_USE]
)
def test_every_optimizer_in_use_builds_and_trains_a_quadratic(name, config):
    params = {"w": jnp.array([3.0, -2.0]), "bias": jnp.array([1.0])}
    config = {**config, "learning_rate": 0.05, "grad_clip_norm": 0.0}
    tx, _ = optim.make_optimizer(config, CONSTANT, params, 100)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["bias"] ** 2)
    for _ in range(50):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 14.0 * 0.5, name


def test_optimizer_settings_outside_kwargs_or_unknown_to_it_are_named():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"config.optim has \['b1'\].*kwargs"):
        optim.make_optimizer({**OPTIM, "b1": 0.9}, CONSTANT, params, 10)
    with pytest.raises(ValueError, match=r"\['momentum'\] are not arguments of optax.adamw"):
        optim.make_optimizer({**OPTIM, "kwargs": {"momentum": 0.9}}, CONSTANT, params, 10)


def test_decoupled_decay_goes_to_the_optimizer_and_l2_before_it():
    """'lion' takes weight_decay (decoupled, masked by no_decay); 'adam' does not (L2 on grads)."""
    params = {"dense": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    lion = {**OPTIM, "name": "lion", "weight_decay": 0.5}
    updates, _ = one_update(lion, params, zero_grads)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
    # Adam on an L2-decayed gradient: a first step of Adam is -lr * sign(g) for any g != 0.
    adam = {**OPTIM, "name": "adam", "weight_decay": 0.5}
    updates, _ = one_update(adam, params, zero_grads)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1, rtol=1e-4)
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)
