"""transfer.adapt_params: posemb resampling, head re-init, scan layout, and refusing what does not fit."""

import jax
import numpy as np
import pytest
from helpers import TINY, assert_params_identical, random_params

from vit_jax import get_config
from vit_jax.model import transfer, vit

TINY = {**TINY, "num_classes": 10, "num_registers": 2}
POSEMB = transfer.POSEMB_KEY


@pytest.fixture(scope="module")
def src():
    return get_config(**TINY)


@pytest.fixture(scope="module")
def params(src):
    return random_params(vit.VisionTransformer(src))


def flat(tree):
    return {k: np.asarray(v) for k, v in transfer.flatten(tree).items()}


def test_same_config_is_identity(src, params):
    assert_params_identical(transfer.adapt_params(params, src, src), params)


def test_posemb_resized_to_non_square_grid_keeping_prefix_rows(src, params):
    dst = src.replace(image_size=(12, 24))  # grid 4x4 → 3x6
    adapted = transfer.adapt_params(params, src, dst, jax.random.key(1))
    old, new = flat(params)[POSEMB], flat(adapted)[POSEMB]
    prefix = 1 + src.num_registers
    assert new.shape == (1, prefix + 3 * 6, 32)
    np.testing.assert_array_equal(new[:, :prefix], old[:, :prefix])  # class/register rows kept
    expected = vit.resize_posemb_grid(old[:, prefix:], (4, 4), (3, 6))
    np.testing.assert_allclose(new[:, prefix:], expected, atol=1e-6)
    assert_params_identical(adapted, params, skip=(POSEMB,))
    logits = vit.VisionTransformer(dst).apply({"params": adapted}, np.zeros((1, 12, 24, 3)))
    assert logits.shape == (1, 10)


def test_constant_posemb_stays_constant_when_resampled(src, params):
    constant = flat(params)
    constant[POSEMB] = np.full_like(constant[POSEMB], 0.25)
    adapted = transfer.adapt_params(transfer.unflatten(constant), src, src.replace(image_size=32))
    np.testing.assert_allclose(flat(adapted)[POSEMB], 0.25, atol=1e-6)


def test_head_reinitialized_when_classes_differ(src, params):
    dst = src.replace(num_classes=3, head_bias_init=-2.0)
    adapted = flat(transfer.adapt_params(params, src, dst, jax.random.key(1)))
    np.testing.assert_array_equal(adapted["head/kernel"], np.zeros((32, 3)))
    np.testing.assert_array_equal(adapted["head/bias"], np.full((3,), -2.0))
    assert_params_identical(transfer.unflatten(adapted), params, skip=("head/kernel", "head/bias"))


def test_head_dropped_for_zero_classes(src, params):
    adapted = flat(transfer.adapt_params(params, src, src.replace(num_classes=0)))
    assert not any(key.startswith("head/") for key in adapted)


def test_loop_scan_loop_round_trip(src, params):
    scanned = transfer.adapt_params(params, src, src.replace(scan=True))
    assert flat(scanned)["Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)
    assert_params_identical(transfer.adapt_params(scanned, src.replace(scan=True), src), params)


def test_pre_logits_dropped_when_target_has_none():
    src = get_config(**{**TINY, "representation_size": 16})
    params = random_params(vit.VisionTransformer(src))
    dst = src.replace(representation_size=None)
    adapted = flat(transfer.adapt_params(params, src, dst))
    assert not any(key.startswith("pre_logits/") for key in adapted)
    np.testing.assert_array_equal(
        adapted["head/kernel"], np.zeros((32, 10))
    )  # new inputs, new head


@pytest.mark.parametrize(
    "change, key, got, want",
    [
        (dict(hidden_size=64), "embedding/kernel", (4, 4, 3, 32), (4, 4, 3, 64)),
        (
            dict(mlp_dim=128),
            "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel",
            (32, 64),
            (32, 128),
        ),
        (
            dict(num_heads=2),
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
            (32, 4, 8),
            (32, 2, 16),
        ),
        (dict(num_registers=3), "registers", (1, 2, 32), (1, 3, 32)),
    ],
)
def test_mismatch_names_first_key_and_both_shapes(src, params, change, key, got, want):
    with pytest.raises(ValueError) as error:
        transfer.adapt_params(params, src, src.replace(**change))
    assert error.value.key == key
    assert f"{key!r} has shape {got}" in str(error.value)
    assert f"expects {want}" in str(error.value)


def test_missing_and_extra_keys_are_named(src, params):
    with pytest.raises(ValueError, match="query_norm/scale.*missing"):
        transfer.adapt_params(params, src, src.replace(qk_norm=True))
    extra = {**flat(params), "Transformer/encoderblock_0/adapter/kernel": np.zeros((32, 4))}
    with pytest.raises(
        ValueError, match="'Transformer/encoderblock_0/adapter/kernel'.*has no place"
    ):
        transfer.adapt_params(transfer.unflatten(extra), src, src)
