"""Parity with the implementations that wrote tests/fixtures, and lossless save → load round trips.

For every fixture: load its weights, reproduce its logits to 1e-4; then save in every format that can
represent the model, load back, and get the same config, the same params and the same logits.
"""

import functools
import json

import numpy as np
import pytest
from helpers import FIXTURES, assert_params_identical, logits_of
from safetensors.numpy import load_file

import vit_jax
from vit_jax.interop import formats, save

# fixture → (weights inside its folder, load_pretrained kwargs the format cannot provide itself).
SOURCES = {
    "vit_jax_token_prelogits": ("params.npz", {}),
    "vit_jax_gap": ("params.npz", {}),
    "big_vision_map_sincos2d": ("params.npz", {}),
    "big_vision_gap_scan": ("params.npz", {}),
    "timm_token": ("model.safetensors", {"num_heads": 4}),  # a fused qkv hides the heads
    "timm_avg_reg4_layerscale_qknorm": ("model.safetensors", {}),  # q_norm tells the heads
    "hf_vit": ("", {}),  # the folder
    "timm_deit_distilled": ("model.safetensors", {"num_heads": 4}),  # as timm_token
    # fixture.json `load_with`: timm read these weights at patch 2 (PI-resized kernel), 8 px.
    "flexi_patch4_to_patch2": ("params.npz", {"patch_size": 2, "image_size": 8}),
    # The paper's hybrids: a ResNet stem (root + one bottleneck unit / the root alone) first.
    "vit_jax_hybrid_r1_token": ("params.npz", {}),
    "vit_jax_hybrid_stem_gap": ("params.npz", {}),
    "timm_hybrid_r1": ("model.safetensors", {"num_heads": 4}),  # as timm_token
}
# What each format cannot represent, per fixture: saving must refuse, naming the reason.
UNREPRESENTABLE = {
    ("vit_jax_token_prelogits", "timm"): "pre-logits",
    ("vit_jax_token_prelogits", "hf"): "pre-logits together with a head",
    ("vit_jax_gap", "hf"): "pool='gap'",
    ("big_vision_map_sincos2d", "hf"): "pool='map'",
    ("big_vision_gap_scan", "hf"): "pool='gap'",
    ("timm_avg_reg4_layerscale_qknorm", "hf"): "registers",
    ("timm_deit_distilled", "hf"): "distillation_token",
    ("vit_jax_hybrid_r1_token", "hf"): "ResNet stem",
    ("vit_jax_hybrid_stem_gap", "hf"): "ResNet stem",
    ("timm_hybrid_r1", "hf"): "ResNet stem",
}
# What loading the written tensors alone must be told (a reader that ignores our metadata): exactly
# what the format omits. `load_pretrained` itself needs none of it (test_formats.py).
RELOAD_OVERRIDES = {
    ("vit_jax_token_prelogits", "npz"): {},
    ("vit_jax_gap", "npz"): {},
    ("vit_jax_gap", "timm"): {"num_heads": 4, "gelu_approximate": True},
    ("big_vision_map_sincos2d", "npz"): {},
    # timm has no sin-cos: the fixed table is written as a learned pos_embed that equals it.
    ("big_vision_map_sincos2d", "timm"): {
        "num_heads": 4,
        "gelu_approximate": True,
        "posemb": "sincos2d",
    },
    ("big_vision_gap_scan", "npz"): {"scan": True},
    # Without prefix tokens posemb_covers_prefix changes nothing; timm reads back its default.
    ("big_vision_gap_scan", "timm"): {
        "num_heads": 4,
        "gelu_approximate": True,
        "scan": True,
        "posemb_covers_prefix": False,
    },
    ("timm_token", "npz"): {"gelu_approximate": False},
    ("timm_token", "timm"): {"num_heads": 4},
    ("timm_token", "hf"): {},
    ("timm_avg_reg4_layerscale_qknorm", "npz"): {"gelu_approximate": False},
    ("timm_avg_reg4_layerscale_qknorm", "timm"): {},
    ("hf_vit", "npz"): {"gelu_approximate": False, "layernorm_epsilon": 1e-12},
    ("hf_vit", "timm"): {"num_heads": 4, "layernorm_epsilon": 1e-12},
    ("hf_vit", "hf"): {},
    ("timm_deit_distilled", "npz"): {"gelu_approximate": False},
    ("timm_deit_distilled", "timm"): {"num_heads": 4},
    ("flexi_patch4_to_patch2", "npz"): {},
    ("flexi_patch4_to_patch2", "timm"): {"num_heads": 4, "gelu_approximate": True},
    ("flexi_patch4_to_patch2", "hf"): {},
    # The stem's epsilons are numerics, not tensors: each library reads back its own.
    ("vit_jax_hybrid_r1_token", "npz"): {},
    ("vit_jax_hybrid_stem_gap", "npz"): {},
    **{
        (name, "timm"): {
            "num_heads": 4,
            "gelu_approximate": True,
            "resnet_norm_epsilon": 1e-6,
            "resnet_ws_epsilon": 1e-5,
        }
        for name in ("vit_jax_hybrid_r1_token", "vit_jax_hybrid_stem_gap")
    },
    ("timm_hybrid_r1", "npz"): {
        "gelu_approximate": False,
        "resnet_norm_epsilon": 1e-5,
        "resnet_ws_epsilon": 1e-8,
    },
    ("timm_hybrid_r1", "timm"): {"num_heads": 4},
}


@functools.cache
def load_fixture(name):
    weights, kwargs = SOURCES[name]
    model, params = vit_jax.load_pretrained(str(FIXTURES / name / weights), **kwargs)
    images = np.load(FIXTURES / name / "images.npy")
    return model.config, params, images, np.load(FIXTURES / name / "logits.npy")


@pytest.mark.parametrize("name", SOURCES)
def test_reproduces_source_logits(name):
    config, params, images, expected = load_fixture(name)
    logits = logits_of(config, params, images)
    assert logits.shape == expected.shape == (4, 10)
    assert np.abs(logits - expected).max() <= 1e-4


def test_inferred_configs_match_the_fixture_descriptions():
    configs = {name: load_fixture(name)[0] for name in SOURCES}
    assert configs["vit_jax_token_prelogits"].representation_size == 32
    assert configs["vit_jax_gap"].pool == "gap" and not configs["vit_jax_gap"].has_class_token
    assert configs["big_vision_map_sincos2d"].pool == "map"
    assert configs["big_vision_map_sincos2d"].posemb == "sincos2d"
    assert (
        configs["big_vision_gap_scan"].scan
        and not configs["big_vision_gap_scan"].posemb_covers_prefix
    )
    timm_reg = configs["timm_avg_reg4_layerscale_qknorm"]
    assert (timm_reg.num_registers, timm_reg.qk_norm, timm_reg.fc_norm, timm_reg.pool) == (
        4,
        True,
        True,
        "gap",
    )
    assert timm_reg.layerscale_init is not None and timm_reg.num_heads == 4
    assert not configs["timm_token"].gelu_approximate and configs["vit_jax_gap"].gelu_approximate
    assert configs["hf_vit"].layernorm_epsilon == 1e-12
    for config in configs.values():
        assert (config.hidden_size, config.num_layers, config.mlp_dim, config.num_heads) == (
            32,
            2,
            64,
            4,
        )
        assert config.num_classes == 10
    plain = [n for n in configs if n != "flexi_patch4_to_patch2" and "hybrid" not in n]
    assert all(configs[n].patch_size == (4, 4) for n in plain)
    assert configs["flexi_patch4_to_patch2"].patch_size == (2, 2)
    assert configs["flexi_patch4_to_patch2"].image_size == (8, 8)
    deit = configs["timm_deit_distilled"]
    assert deit.distillation_token and deit.num_prefix_tokens == 2
    # Hybrids (fixture.json): the ResNet stages and root width, the patch on the stem's map.
    hybrids = {n: configs[n] for n in configs if "hybrid" in n}
    assert {
        n: (c.resnet_stages, c.resnet_width, c.patch_size, c.pool) for n, c in hybrids.items()
    } == {
        "vit_jax_hybrid_r1_token": ((1,), 64, (1, 1), "token"),
        "vit_jax_hybrid_stem_gap": ((), 64, (2, 2), "gap"),
        "timm_hybrid_r1": ((1,), 32, (1, 1), "token"),
    }
    assert all(c.image_size == (16, 16) and c.num_channels == 3 for c in hybrids.values())
    assert configs["timm_hybrid_r1"].resnet_norm_epsilon == 1e-5  # timm's GroupNorm


def _round_trip_cases():
    for name in SOURCES:
        for fmt in formats.REGISTRY:
            yield pytest.param(name, fmt, id=f"{name}-{fmt}")


@pytest.mark.parametrize("name, fmt", _round_trip_cases())
def test_save_and_load_back(name, fmt, tmp_path):
    config, params, images, _ = load_fixture(name)
    path = tmp_path / (
        "model" if fmt == "hf" else f"model.{'npz' if fmt == 'npz' else 'safetensors'}"
    )
    if (name, fmt) in UNREPRESENTABLE:
        with pytest.raises(ValueError, match=f"format '{fmt}'.*{UNREPRESENTABLE[name, fmt]}"):
            vit_jax.save_pretrained(params, str(path), format=fmt, model=config)
        assert not path.exists()  # nothing half-written
        return
    vit_jax.save_pretrained(params, str(path), format=fmt, model=config)
    overrides = save.reload_overrides(params, config, fmt)
    assert overrides == RELOAD_OVERRIDES[name, fmt]
    model, reloaded = vit_jax.load_pretrained(str(path), **overrides)
    assert model.config == config
    assert_params_identical(reloaded, params, same_dtype=True)
    np.testing.assert_array_equal(
        logits_of(model.config, reloaded, images), logits_of(config, params, images)
    )


@pytest.mark.parametrize(
    "name, fmt, weights",
    [
        ("vit_jax_token_prelogits", "npz", "params.npz"),
        ("vit_jax_gap", "npz", "params.npz"),
        ("timm_token", "timm", "model.safetensors"),
        ("timm_avg_reg4_layerscale_qknorm", "timm", "model.safetensors"),
        ("timm_deit_distilled", "timm", "model.safetensors"),
        ("vit_jax_hybrid_r1_token", "npz", "params.npz"),
        ("vit_jax_hybrid_stem_gap", "npz", "params.npz"),
        ("timm_hybrid_r1", "timm", "model.safetensors"),
        ("hf_vit", "hf", "model.safetensors"),
    ],
)
def test_written_file_equals_the_source_file(name, fmt, weights, tmp_path):
    """Saving in the source's own format gives back its tensors: same keys, shapes and values, so
    the source library's strict loader (timm load_state_dict, HF from_pretrained) accepts it."""
    config, params, _, _ = load_fixture(name)
    path = tmp_path / ("model" if fmt == "hf" else "model.bin")
    vit_jax.save_pretrained(params, str(path), format=fmt, model=config)
    read = (lambda p: dict(np.load(p))) if fmt == "npz" else load_file
    written = read(str(path / weights) if fmt == "hf" else str(path))
    source = read(str(FIXTURES / name / weights))
    assert sorted(written) == sorted(source)
    for key in source:
        np.testing.assert_array_equal(written[key], source[key], err_msg=key)
    if fmt == "hf":
        ours = json.loads((path / "config.json").read_text())
        theirs = json.loads((FIXTURES / name / "config.json").read_text())
        shared = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        shared += [
            "hidden_act",
            "layer_norm_eps",
            "image_size",
            "patch_size",
            "qkv_bias",
            "id2label",
        ]
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
