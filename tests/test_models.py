"""The ViT model: shapes, parameter layout, the recipe's invariances, and numerics."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import FIXTURES, TINY, random_params

import vit_jax
from vit_jax.model import layers, vit
from vit_jax.model.config import get_config


def tiny(**overrides) -> vit.VisionTransformer:
    return vit_jax.create_model(None, **{**TINY, "num_classes": 10, **overrides})


def images(batch=2, size=(16, 16), seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, *size, 3), minval=-1.0, maxval=1.0)


# --- Shapes and the parameter layout -------------------------------------------------------------


@pytest.mark.parametrize("pool", ["token", "gap", "map", "none"])
def test_output_shape_for_every_pooling(pool):
    model = tiny(pool=pool)
    params = vit.init_params(model, jax.random.key(0))
    logits = model.apply({"params": params}, images(batch=3))
    expected_tokens = 16 + (1 if pool == "token" else 0)
    if pool == "none":
        chex.assert_shape(logits, (3, expected_tokens, 10))
    else:
        chex.assert_shape(logits, (3, 10))
    chex.assert_type(logits, jnp.float32)


def test_map_pooling_has_qkv_biases_even_without_them_in_the_encoder():
    # As big_vision's MAPHead and timm's attn_pool (which a timm export must load into strictly).
    model = vit_jax.create_model(None, pool="map", qkv_bias=False, **TINY)
    keys = {"/".join(k) for k in traverse_util.flatten_dict(vit.param_shapes(model))}
    pool = "MAPHead_0/MultiHeadDotProductAttention_0"
    assert {f"{pool}/{n}/bias" for n in ("query", "key", "value")} <= keys
    assert not [k for k in keys if k.startswith("Transformer/") and k.endswith("query/bias")]


def test_no_head_returns_the_pooled_representation():
    model = tiny(num_classes=0, representation_size=24)
    params = vit.init_params(model, jax.random.key(0))
    chex.assert_shape(model.apply({"params": params}, images()), (2, 24))
    assert "head" not in params


# Published counts for ImageNet-1k heads at 224 px (timm/vit_jax model cards agree).
PARAM_COUNTS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "S/32": 22_878_952,
    "B/16": 86_567_656,
    "B/32": 88_224_232,
    "B/8": 86_576_872,
    "L/16": 304_326_632,
    "L/32": 306_535_400,
    "H/14": 632_045_800,
}


@pytest.mark.parametrize("variant", PARAM_COUNTS)
def test_parameter_count_at_224px(variant):
    shapes = vit.param_shapes(vit_jax.create_model(variant, num_classes=1000))
    assert vit.count_params(shapes) == PARAM_COUNTS[variant]


def published_b16_shapes():
    """ViT-B_16.npz's keys and shapes, written out from the published layout's description."""
    d, heads, mlp, tokens = 768, 12, 3072, 197
    shapes = {
        "embedding/kernel": (16, 16, 3, d),
        "embedding/bias": (d,),
        "cls": (1, 1, d),
        "Transformer/posembed_input/pos_embedding": (1, tokens, d),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
        "head/kernel": (d, 1000),
        "head/bias": (1000,),
    }
    for i in range(12):
        block = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{block}/{ln}/scale"] = shapes[f"{block}/{ln}/bias"] = (d,)
        for proj in ("query", "key", "value"):
            shapes[f"{block}/MultiHeadDotProductAttention_1/{proj}/kernel"] = (d, heads, d // heads)
            shapes[f"{block}/MultiHeadDotProductAttention_1/{proj}/bias"] = (heads, d // heads)
        shapes[f"{block}/MultiHeadDotProductAttention_1/out/kernel"] = (heads, d // heads, d)
        shapes[f"{block}/MultiHeadDotProductAttention_1/out/bias"] = (d,)
        shapes[f"{block}/MlpBlock_3/Dense_0/kernel"] = (d, mlp)
        shapes[f"{block}/MlpBlock_3/Dense_0/bias"] = (mlp,)
        shapes[f"{block}/MlpBlock_3/Dense_1/kernel"] = (mlp, d)
        shapes[f"{block}/MlpBlock_3/Dense_1/bias"] = (d,)
    return shapes


def test_b16_has_exactly_the_published_keys_and_shapes():
    shapes = traverse_util.flatten_dict(vit.param_shapes(vit_jax.create_model("ViT-B/16")), sep="/")
    expected = published_b16_shapes()
    assert len(expected) == 200
    assert {k: tuple(v.shape) for k, v in shapes.items()} == expected


def test_options_add_keys_but_never_rename_the_published_ones():
    plain = traverse_util.flatten_dict(vit.param_shapes(tiny()), sep="/")
    rich = traverse_util.flatten_dict(
        vit.param_shapes(
            tiny(num_registers=2, layerscale_init=0.1, qk_norm=True, representation_size=32)
        ),
        sep="/",
    )
    renamed_or_removed = set(plain) - set(rich)
    # Only the posemb changes shape (it gains the register rows); no key disappears.
    assert not renamed_or_removed
    assert rich["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + 2 + 16, 32)


@pytest.mark.parametrize("name", ["ViT-B/16", "B/16", "ViT-B_16", "B_16"])
def test_variant_names(name):
    config = vit_jax.get_config(name)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.patch_size) == (
        768,
        12,
        12,
        (16, 16),
    )


@pytest.mark.parametrize(
    "variant, widths",
    [("Ti/16", (192, 768, 3, 12)), ("S/16", (384, 1536, 6, 12)), ("L/16", (1024, 4096, 16, 24)),
     ("H/14", (1280, 5120, 16, 32))],
)  # fmt: skip
def test_variant_table(variant, widths):
    config = vit_jax.get_config(variant)
    assert (config.hidden_size, config.mlp_dim, config.num_heads, config.num_layers) == widths


def test_config_round_trips_through_json(tmp_path):
    config = vit_jax.get_config("S/16", num_classes=10, image_size=(224, 160), num_registers=4)
    path = tmp_path / "model_config.json"
    path.write_text(config.to_json())
    assert vit_jax.ViTConfig.from_json(path.read_text()) == config
    assert json.loads(path.read_text())["image_size"] == [224, 160]


# --- The recipe, step by step ---------------------------------------------------------------------


def test_patchify_matches_the_patch_embedding_conv():
    model = tiny(image_size=(16, 24))
    params = random_params(model)
    x = images(size=(16, 24))
    embedding = params["embedding"]
    conv_tokens = vit.PatchEmbedding(model.config).apply({"params": embedding}, x)
    flat = vit.patchify(x, 4)
    linear_tokens = flat @ embedding["kernel"].reshape(-1, 32) + embedding["bias"]
    chex.assert_shape(flat, (2, 4 * 6, 4 * 4 * 3))
    chex.assert_trees_all_close(conv_tokens, linear_tokens, atol=1e-5)


def test_patchify_flattens_each_patch_row_major():
    x = jnp.arange(2 * 4 * 6 * 1, dtype=jnp.float32).reshape(2, 4, 6, 1)
    patches = vit.patchify(x, (2, 3))
    np.testing.assert_array_equal(patches[0, 1], np.asarray(x[0, 0:2, 3:6, 0]).reshape(-1))


def permute_patches(x, permutation, patch=4):
    """Rearranges the image's patches on the grid (row-major patch order)."""
    b, h, w, c = x.shape
    gh, gw = h // patch, w // patch
    grid = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(b, gh * gw, patch, patch, c)[:, permutation]
    grid = grid.reshape(b, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, h, w, c)


@pytest.mark.parametrize("posemb", ["none", "learn", "sincos2d"])
def test_position_embeddings_are_what_break_permutation_equivariance(posemb):
    model = tiny(pool="gap", posemb=posemb)
    params = random_params(model)
    x = images()
    permutation = np.random.default_rng(0).permutation(16)
    _, aux = model.apply({"params": params}, x, return_intermediates=True)
    _, aux_permuted = model.apply(
        {"params": params}, permute_patches(x, permutation), return_intermediates=True
    )
    equivariant = np.allclose(
        aux["encoded"][:, permutation], aux_permuted["encoded"], atol=1e-5, rtol=1e-5
    )
    assert equivariant == (posemb == "none")


def test_bfloat16_compute_stays_close_to_float32():
    model32 = tiny()
    params = random_params(model32)
    model16 = tiny(dtype="bfloat16")
    logits32 = model32.apply({"params": params}, images())
    logits16 = model16.apply({"params": params}, images())
    assert logits16.dtype == jnp.float32  # logits are returned in f32 for the loss
    scale = float(jnp.abs(logits32).max())
    assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale
    assert not np.array_equal(logits16, logits32)  # really computed in bf16


def test_params_stay_float32_under_bfloat16_compute():
    shapes = vit.param_shapes(tiny(dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype("float32")}


def test_dropout_and_drop_path_are_identity_at_eval_only():
    regularized = tiny(dropout_rate=0.3, attention_dropout_rate=0.3, drop_path_rate=0.5)
    params = random_params(regularized)
    plain = tiny().apply({"params": params}, images())
    chex.assert_trees_all_close(regularized.apply({"params": params}, images()), plain)
    trained = regularized.apply(
        {"params": params}, images(), train=True, rngs={"dropout": jax.random.key(0)}
    )
    assert not np.allclose(trained, plain, atol=1e-4)


def test_drop_path_rate_rises_linearly_with_depth():
    rates = layers.drop_path_rates(
        vit_jax.get_config(None, **{**TINY, "num_layers": 5}, drop_path_rate=0.2)
    )
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2], atol=1e-7)
    # A single block gets the configured rate rather than none at all.
    single = vit_jax.get_config(None, **{**TINY, "num_layers": 1}, drop_path_rate=0.2)
    np.testing.assert_allclose(layers.drop_path_rates(single), [0.2])


def test_drop_path_drops_whole_examples_and_rescales():
    x = jnp.ones((1000, 3, 2))
    y = layers.drop_path(x, jnp.asarray(0.25), jax.random.key(0))
    per_example = np.asarray(y[:, 0, 0])
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(y == y[:, :1, :1])  # the whole branch of an example is kept or dropped
    assert abs((per_example == 0).mean() - 0.25) < 0.05


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scan_and_loop_agree_given_the_same_params(remat_policy):
    loop = tiny(layerscale_init=0.5, remat_policy=remat_policy)
    scan = tiny(layerscale_init=0.5, remat_policy=remat_policy, scan=True)
    params = random_params(loop)
    stacked = vit.stack_layers(params, num_layers=2)
    chex.assert_trees_all_equal_shapes(stacked, vit.param_shapes(scan))
    chex.assert_trees_all_close(
        scan.apply({"params": stacked}, images()),
        loop.apply({"params": params}, images()),
        atol=1e-5,
    )
    chex.assert_trees_all_equal(vit.unstack_layers(stacked), params)


def test_scan_returns_per_layer_attention_and_tokens():
    scan = tiny(scan=True)
    params = vit.stack_layers(random_params(tiny()), num_layers=2)
    _, aux = scan.apply(
        {"params": params}, images(), return_attention=True, return_intermediates=True
    )
    chex.assert_shape(aux["attention"], (2, 2, 4, 17, 17))
    chex.assert_shape(aux["tokens"], (2, 2, 17, 32))


def test_attention_weights_are_a_distribution_over_keys():
    model = tiny(num_registers=2)
    params = random_params(model)
    logits, aux = model.apply({"params": params}, images(), return_attention=True)
    chex.assert_shape(aux["attention"], (2, 2, 4, 19, 19))  # layers, batch, heads, queries, keys
    assert bool(jnp.all(aux["attention"] >= 0))
    chex.assert_trees_all_close(aux["attention"].sum(-1), jnp.ones((2, 2, 4, 19)), atol=1e-5)
    # The explicit-softmax path used for the weights computes the same function as the fused one.
    chex.assert_trees_all_close(logits, model.apply({"params": params}, images()), atol=1e-5)


def test_intermediates_are_the_per_layer_tokens():
    model = tiny()
    params = random_params(model)
    _, aux = model.apply({"params": params}, images(), return_intermediates=True)
    chex.assert_shape(aux["tokens"], (2, 2, 17, 32))
    chex.assert_shape(aux["pre_logits"], (2, 32))
    # The encoded tokens are the last layer's tokens after the final LayerNorm.
    normed = nn.LayerNorm(1e-6).apply(
        {"params": params["Transformer"]["encoder_norm"]}, aux["tokens"][-1]
    )
    chex.assert_trees_all_close(normed, aux["encoded"], atol=1e-5)


def test_other_resolutions_resample_the_position_embeddings():
    # Bilinear resampling of a ramp along the width: 4 -> 8 columns, half-pixel centres, so output
    # column j reads input position j/2 - 1/4 (clamped to the edges); rows are copied.
    ramp = jnp.tile(jnp.arange(4.0), (4, 1)).reshape(1, 16, 1)
    resized = vit.resize_posemb_grid(ramp, (4, 4), (6, 8)).reshape(6, 8)
    expected = np.clip(np.arange(8) / 2 - 0.25, 0, 3)
    np.testing.assert_allclose(resized, np.tile(expected, (6, 1)), atol=1e-6)
    posemb = ramp.repeat(32, axis=-1)
    chex.assert_trees_all_equal(vit.resize_posemb_grid(posemb, (4, 4), (4, 4)), posemb)

    # At 24x32 px the model uses exactly those resampled rows (class row kept): the same logits as
    # a model built at 24x32 whose table was resampled beforehand.
    model = tiny()
    params = random_params(model)
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    resampled = jnp.concatenate(
        [table[:, :1], vit.resize_posemb_grid(table[:, 1:], (4, 4), (6, 8))], axis=1
    )
    native = tiny(image_size=(24, 32))
    native_params = jax.tree.map(lambda x: x, params)
    native_params["Transformer"]["posembed_input"]["pos_embedding"] = resampled
    x = images(size=(24, 32))
    chex.assert_trees_all_close(
        model.apply({"params": params}, x), native.apply({"params": native_params}, x), atol=1e-6
    )


def test_sincos_posemb_has_no_parameter_and_is_fixed():
    model = tiny(posemb="sincos2d", pool="map")
    params = vit.init_params(model, jax.random.key(0))
    assert "posembed_input" not in params["Transformer"]
    emb = vit.posemb_sincos_2d((4, 4), 32)
    chex.assert_shape(emb, (1, 16, 32))
    np.testing.assert_allclose(emb[0, 0], [0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8)


# --- Published checkpoints load as plain unflattens -----------------------------------------------


@pytest.mark.parametrize(
    "fixture, overrides",
    [("vit_jax_token_prelogits", dict(representation_size=32)), ("vit_jax_gap", dict(pool="gap"))],
)
def test_published_vit_jax_fixture_is_a_plain_unflatten(fixture, overrides):
    folder = FIXTURES / fixture
    meta = json.loads((folder / "fixture.json").read_text())
    model = vit_jax.create_model(
        None,
        hidden_size=meta["hidden_size"],
        mlp_dim=meta["mlp_dim"],
        num_heads=meta["num_heads"],
        num_layers=meta["num_layers"],
        patch_size=meta["patch_size"],
        image_size=meta["image_size"],
        num_classes=meta["num_classes"],
        **overrides,
    )
    with np.load(folder / "params.npz") as npz:
        params = traverse_util.unflatten_dict({tuple(k.split("/")): npz[k] for k in npz.files})
    chex.assert_trees_all_equal_shapes(params, vit.param_shapes(model))
    logits = model.apply({"params": params}, np.load(folder / "images.npy"))
    np.testing.assert_allclose(logits, np.load(folder / "logits.npy"), atol=1e-4, rtol=0)


# --- Bad input fails before any compute, naming the value -----------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="ViT-X/16"), "ViT-X/16"),
        (dict(variant="B16"), "B16"),
        (dict(image_size=30), "not divisible by patch_size"),
        (dict(num_heads=5), "num_heads=5"),
        (dict(pool="cls"), "pool='cls'.*token, gap, map, none"),
        (dict(posemb="rope"), "posemb='rope'.*learn, sincos2d, none"),
        (dict(dtype="float8"), "dtype='float8'"),
        (dict(dropout_rate=1.5), "dropout_rate=1.5"),
        (dict(hidden_sise=32), "hidden_sise"),
        (dict(pool="token", class_token=False), "class_token"),
    ],
)
def test_bad_config_raises_a_value_error_naming_it(kwargs, message):
    variant = kwargs.pop("variant", None)
    with pytest.raises(ValueError, match=message):
        vit_jax.create_model(variant, **({**TINY, **kwargs} if variant is None else kwargs))


def test_a_size_is_an_int_a_pair_or_a_one_element_sequence():
    # (8,) is what ml_collections makes of `--config.model.patch_size=8` for a tuple field.
    for given in (8, (8, 8), [8], (8,)):
        assert get_config(None, **{**TINY, "patch_size": given}).patch_size == (8, 8)
    assert get_config(None, **{**TINY, "image_size": (16, 32)}).image_size == (16, 32)
    for bad in ((8, 8, 8), (), (0, 8), (8.0, 8)):
        with pytest.raises(ValueError, match=r"patch_size=.*expected a positive int or a"):
            get_config(None, **{**TINY, "patch_size": bad})


def test_wrong_image_shape_at_apply_time_is_named():
    model = tiny()
    params = vit.init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\(18, 18\).*patch_size"):
        model.apply({"params": params}, jnp.zeros((1, 18, 18, 3)))
    with pytest.raises(ValueError, match="expected"):
        model.apply({"params": params}, jnp.zeros((1, 16, 16, 1)))
