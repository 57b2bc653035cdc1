"""The paper's hybrids (§3.1): a ResNet stem whose feature map the patch embedding cuts.

Parity with the original code and timm is in test_parity.py (fixtures `vit_jax_hybrid_*`,
`timm_hybrid_r1`); here: the published variants by name with timm's parameter counts, the stem's
stride in every grid computation, training, the layouts (scan, remat, bf16), attention maps over the
feature-map grid, and every bad input refused by name before any compute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FIXTURES, random_params

import vit_jax
from vit_jax.interop.formats import layout, source, timm
from vit_jax.model import config as model_config
from vit_jax.model import transfer, visualize, vit
from vit_jax.tools.bench import flops
from vit_jax.train import step as train_step

# A tiny hybrid: the root (stride 4) and one bottleneck stage at 16 px, 1x1 patches: a 4x4 grid.
TINY_HYBRID = dict(
    hidden_size=32,
    mlp_dim=64,
    num_heads=4,
    num_layers=1,
    image_size=16,
    patch_size=1,
    resnet_stages=(1,),
    resnet_width=32,
    num_classes=10,
)
IMAGES = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1.0, maxval=1.0)

# `sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())`, timm 1.0.31:
# the ports of the published files, so their layouts have exactly these many parameters.
TIMM_PARAM_COUNTS = {
    ("R+ViT-Ti/16", 224): ("vit_tiny_r_s16_p8_224", 6_337_704),
    ("R26+ViT-S/32", 224): ("vit_small_r26_s32_224", 36_431_912),
    ("R26+ViT-B/32", 224): ("vit_base_r26_s32_224", 101_383_976),
    ("R50+ViT-B/16", 224): ("vit_base_r50_s16_224", 98_659_112),
    ("R50+ViT-B/16", 384): ("vit_base_r50_s16_384", 98_950_952),
    ("R50+ViT-L/32", 224): ("vit_large_r50_s32_224", 328_994_856),
}


@pytest.mark.parametrize("variant, size", list(TIMM_PARAM_COUNTS))
def test_published_variants_have_timms_parameter_count(variant, size):
    model = vit_jax.create_model(variant, num_classes=1000, image_size=size)
    assert vit.count_params(vit.param_shapes(model)) == TIMM_PARAM_COUNTS[variant, size][1]
    # and timm's name for it is what the config parses from, and writes back
    name = TIMM_PARAM_COUNTS[variant, size][0]
    from vit_jax.interop.formats import timm_config

    parsed = model_config.ViTConfig().replace(**timm_config.parse_timm_name(name))
    assert (parsed.resnet_stages, parsed.patch_size, parsed.hidden_size, parsed.num_layers) == (
        model.config.resnet_stages,
        model.config.patch_size,
        model.config.hidden_size,
        model.config.num_layers,
    )


@pytest.mark.parametrize(
    "name, stages, patch, stride",
    [
        ("R50+ViT-B/16", (3, 4, 9), 1, 16),
        ("R50+B/16", (3, 4, 9), 1, 16),
        ("R50+ViT-B_16", (3, 4, 9), 1, 16),  # the published file's name
        ("R50_L_32", (3, 4, 6, 3), 1, 32),  # AugReg's file stems
        ("R26_S_32", (2, 2, 2, 2), 1, 32),
        ("R_Ti_16", (), 8, 4),
    ],
)
def test_hybrid_names_and_their_stride(name, stages, patch, stride):
    config = model_config.get_config(name)
    assert config.is_hybrid and config.resnet_stages == stages
    assert config.patch_size == (patch, patch) and config.stem_stride == stride
    assert config.grid_size == (224 // (stride * patch),) * 2


def test_a_plain_vit_has_no_stem():
    config = model_config.get_config("ViT-B/16")
    assert not config.is_hybrid and config.stem_stride == 1 and config.stem_channels == 3


@pytest.fixture(scope="module")
def hybrid():
    model = vit_jax.create_model(None, **TINY_HYBRID)
    return model, random_params(model)


def test_the_stem_runs_first_and_its_grid_feeds_the_encoder(hybrid):
    model, params = hybrid
    assert model.config.grid_size == (4, 4)
    assert sorted(k for k in params if not k.startswith(("Transformer", "head", "cls"))) == [
        "block1",
        "conv_root",
        "embedding",
        "gn_root",
    ]
    assert params["embedding"]["kernel"].shape == (1, 1, 128, 32)  # 4 * width channels
    logits, aux = model.apply({"params": params}, IMAGES, return_intermediates=True)
    assert logits.shape == (4, 10) and aux["encoded"].shape == (4, 1 + 16, 32)
    # another resolution: the posemb grid follows the feature map (32 px → 8x8 tokens)
    big = jnp.zeros((1, 32, 32, 3))
    assert (
        model.apply({"params": params}, big, return_intermediates=True)[1]["encoded"].shape[1] == 65
    )


def test_a_hybrid_trains(hybrid):
    model, params = hybrid
    targets = jax.nn.one_hot(jnp.arange(4) % 10, 10)
    loss = lambda p: train_step.cross_entropy(model.apply({"params": p}, IMAGES), targets).mean()
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert float(jnp.abs(grads["conv_root"]["kernel"]).max()) > 0  # the stem learns too
    after = jax.jit(loss)(optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g, grads)))
    assert float(after) < float(before)


def test_scan_remat_and_bfloat16_work_as_for_plain_vits(hybrid):
    model, params = hybrid
    expected = model.apply({"params": params}, IMAGES)
    scanned = vit_jax.create_model(None, **TINY_HYBRID, scan=True, remat_policy="full")
    np.testing.assert_allclose(
        scanned.apply({"params": vit.stack_layers(params, 1)}, IMAGES), expected, atol=1e-5
    )
    bf16 = vit_jax.create_model(None, **TINY_HYBRID, dtype="bfloat16")
    assert np.abs(np.asarray(bf16.apply({"params": params}, IMAGES)) - expected).max() < 0.1


def test_attention_maps_and_rollout_are_over_the_feature_map_grid(hybrid):
    model, params = hybrid
    maps = visualize.attention_maps(model, params, IMAGES)
    assert maps.grid == (4, 4) and maps.rollout_map.shape == (4, 4, 4)
    assert maps.class_attention.shape[-2:] == (4, 4)


def test_analytic_flops_count_the_stem():
    config = model_config.get_config("R50+ViT-B/16", num_classes=1000)
    plain = config.replace(resnet_stages=None, patch_size=16)
    assert flops.stem_flops(plain) == 0
    # R50's stem at 224 px: the root conv alone is 2·112²·49·3·64 multiply-adds
    assert flops.stem_flops(config) > 2 * 112 * 112 * 49 * 3 * 64
    assert flops.forward_flops(config) > flops.forward_flops(plain)


# --- Bad input: one clear error before any compute ----------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(resnet_width=48), "resnet_width=48: expected a positive multiple of 32"),
        (dict(resnet_stages=(0, 2)), r"resnet_stages=\(0, 2\): expected a tuple of positive"),
        (dict(resnet_stages="3,4,9"), "resnet_stages='3,4,9'"),
        # 20 px: the stem's stride (8 with two stages) times the patch does not divide it
        (dict(resnet_stages=(1, 1), image_size=20), "stride 8.*multiples of 8"),
    ],
)
def test_bad_stem_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config.ViTConfig(**{**TINY_HYBRID, **overrides})


def test_an_unknown_hybrid_variant_lists_the_published_ones():
    with pytest.raises(ValueError, match=r"unknown hybrid variant 'R101\+ViT-B/16'.*R50\+ViT-B/16"):
        model_config.get_config("R101+ViT-B/16")


def _converted(params):
    return layout.Converted(dict(transfer.flatten(params)))


def test_a_hybrid_file_with_a_missing_stage_is_refused_naming_it(hybrid):
    model = vit_jax.create_model(None, **{**TINY_HYBRID, "resnet_stages": (1, 1, 1)})
    flat = dict(transfer.flatten(vit.param_shapes(model)))
    without_stage_2 = {k: v for k, v in flat.items() if not k.startswith("block2/")}
    with pytest.raises(ValueError, match=r"stages \[1, 3\].*stage\(s\) \[2\] missing"):
        layout.resnet_fields(layout.Converted(without_stage_2))
    without_root = {k: v for k, v in flat.items() if not k.startswith("conv_root/")}
    with pytest.raises(ValueError, match="without its ResNet root: no 'conv_root/kernel'"):
        layout.resnet_fields(layout.Converted(without_root))
    without_proj = {k: v for k, v in flat.items() if k != "block2/unit1/conv_proj/kernel"}
    with pytest.raises(ValueError, match="'block2/unit1/conv_proj/kernel' is missing"):
        layout.resnet_fields(layout.Converted(without_proj))


def _timm_state():
    return source.read_safetensors(str(FIXTURES / "timm_hybrid_r1" / "model.safetensors"))


def test_a_timm_hybrid_whose_backbone_is_not_a_resnetv2_is_refused():
    state = _timm_state()
    # timm's resnet26d hybrids: a deep stem 'conv1.0' and 'layer1' stages, no ResNetV2 names
    renamed = {
        k.replace("patch_embed.backbone.stem.conv", "patch_embed.backbone.conv1.0"): v
        for k, v in state.items()
    }
    with pytest.raises(ValueError, match="'patch_embed.backbone.conv1.0.weight'.*not a ResNetV2"):
        timm.to_ours(renamed, {"num_heads": 4})
    preact = {**state, "patch_embed.backbone.norm.weight": np.ones(128, np.float32)}
    with pytest.raises(ValueError, match="pre-activation ResNetV2"):
        timm.to_ours(preact, {"num_heads": 4})


def test_a_patch_size_change_on_a_hybrid_is_refused_naming_both_sizes(hybrid, tmp_path):
    model, params = hybrid
    path = str(tmp_path / "hybrid.npz")
    vit_jax.save_pretrained(params, path, model=model)
    with pytest.raises(ValueError, match=r"patch_size \(1, 1\) → \(2, 2\) on a hybrid.*stride 4"):
        vit_jax.load_pretrained(path, patch_size=2)
    # a new resolution is fine: the position embeddings follow the feature-map grid
    resized, resized_params = vit_jax.load_pretrained(path, image_size=32)
    assert resized.config.grid_size == (8, 8)
    assert resized_params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 65, 32)


def test_the_recipes_build_a_hybrid_from_their_model_fields(digits_data_dir):
    """What `train.py --config configs/digits.py:tiny --config.model.resnet_stages='(1,)' ...` and
    `configs/finetune.py:R50+ViT-B/16,...` plan (the step itself: test_a_hybrid_trains)."""
    from helpers import load_config, tiny_recipe

    from vit_jax.train import plan

    config = tiny_recipe()
    config.data_dir = digits_data_dir
    config.model.resnet_stages, config.model.resnet_width, config.model.patch_size = (
        (1,),
        32,
        (1, 1),
    )
    run = plan.plan_run(config)
    assert run.vit_config.is_hybrid and run.vit_config.grid_size == (4, 4)
    assert "conv_root" in run.shapes["params"] and "block1" in run.shapes["params"]
    finetune = load_config("configs/finetune.py", "R50+ViT-B/16,cifar10")
    assert finetune.model.resnet_stages == (3, 4, 9) and finetune.model.patch_size == (1, 1)
    assert finetune.init_from == "gs://vit_models/imagenet21k/R50+ViT-B_16.npz"
