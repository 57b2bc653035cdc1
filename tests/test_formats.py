"""The checkpoint-format registry: every registered format is wired end to end.

For every format in `vit_jax.interop.formats.REGISTRY` and a set of models covering every option: saving
either refuses, naming the format and the reason, and writes nothing; or the written files are
detected as that format and load back with no overrides to the same config, params and input
convention (our files describe themselves). Plus timm's own config.json and names, the input
conventions that timm and Hugging Face files carry, and where a format may be written: nothing the
user had is overwritten without `overwrite=True` / `--overwrite`, a suffix of another format is
refused, missing parent folders are created, and no `.partial` file is ever left behind.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from helpers import FIXTURES, assert_params_identical
from safetensors.numpy import load_file, save_file

import vit_jax
from vit_jax.interop import formats, input_convention, load
from vit_jax.interop.formats import layout, timm, timm_config
from vit_jax.interop.formats.source import Source
from vit_jax.model import transfer
from vit_jax.tools import convert as convert_cli

INTERFACE = (
    "NAME", "detect", "read", "to_ours", "from_ours", "unrepresentable", "side_config",
    "required_hints", "SUFFIXES", "outputs", "files", "how_to_load",
)  # fmt: skip
SMALL = dict(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
# One model per group of options; together they cover every pooling, posemb, token and head option.
MODELS = {
    "token_learned_prelogits": dict(representation_size=32),
    "token_learned_tanh": dict(gelu_approximate=True, layernorm_epsilon=1e-12),
    "token_sincos": dict(posemb="sincos2d", posemb_covers_prefix=False, gelu_approximate=False),
    "gap_sincos_gray": dict(pool="gap", posemb="sincos2d", num_channels=1, num_classes=10),
    "gap_registers_layerscale_qknorm_fcnorm": dict(
        pool="gap", num_registers=4, layerscale_init=1e-5, qk_norm=True, fc_norm=True,
        posemb_covers_prefix=False, gelu_approximate=False,
    ),
    "map_no_bias_no_posemb": dict(pool="map", qkv_bias=False, posemb="none", image_size=24),
    "no_head_scan": dict(pool="token", num_classes=0, scan=True),
    "token_distilled": dict(distillation_token=True, gelu_approximate=False),
}  # fmt: skip
# What each format refuses, per model (everything else must round-trip).
REFUSED = {
    ("token_learned_prelogits", "timm"): "pre-logits",
    ("token_learned_prelogits", "hf"): "pre-logits together with a head",
    ("gap_sincos_gray", "hf"): "pool='gap'",
    ("gap_registers_layerscale_qknorm_fcnorm", "hf"): "registers",
    ("map_no_bias_no_posemb", "hf"): "pool='map'",
    ("token_distilled", "hf"): "distillation_token",
}
PRE = input_convention.Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    shapes = vit_jax.model.vit.param_shapes(vit_jax.VisionTransformer(config))
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def model(name):
    config = vit_jax.get_config(**{**SMALL, "num_classes": 5, **MODELS[name]})
    return config, random_params(config)


def test_every_registered_format_has_the_interface():
    assert set(formats.REGISTRY) == {"npz", "timm", "hf"}
    for name, module in formats.REGISTRY.items():
        missing = [f for f in INTERFACE if not hasattr(module, f)]
        assert not missing, f"format {name!r} lacks {missing}"
        assert name == module.NAME


@pytest.mark.parametrize("fmt", sorted(formats.REGISTRY))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_format_round_trips_or_says_why_not(name, fmt, tmp_path):
    config, params = model(name)
    path = str(tmp_path / ("out" if fmt == "hf" else "out.bin"))
    if (name, fmt) in REFUSED:
        with pytest.raises(
            ValueError, match=f"format '{fmt}' cannot represent.*{REFUSED[name, fmt]}"
        ):
            vit_jax.save_pretrained(params, path, format=fmt, model=config, preprocessing=PRE)
        assert not list(tmp_path.iterdir())  # nothing half-written
        return
    vit_jax.save_pretrained(params, path, format=fmt, model=config, preprocessing=PRE)
    assert load.detect_format(Source(path)) is formats.REGISTRY[fmt]
    loaded = load.load_checkpoint(path)  # no overrides: the files say it all
    assert loaded.config == config
    assert loaded.preprocessing == PRE
    assert_params_identical(loaded.params, params)


def test_sincos_table_is_exported_as_the_learned_posemb_it_equals(tmp_path):
    config, params = model("token_sincos")
    vit_jax.save_pretrained(params, str(tmp_path / "t.safetensors"), format="timm", model=config)
    vit_jax.save_pretrained(params, str(tmp_path / "hf"), format="hf", model=config)
    table = np.asarray(vit_jax.model.vit.posemb_sincos_2d((4, 4), 32))
    state = load_file(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(state["pos_embed"], table)  # patches only: no_embed_class
    hf_state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    hf_posemb = hf_state["vit.embeddings.position_embeddings"]
    np.testing.assert_array_equal(hf_posemb[:, 1:], table)
    np.testing.assert_array_equal(hf_posemb[:, :1], 0.0)  # the class token gets nothing added
    # A trained (not fixed) table refuses to be read as sin-cos.
    state["pos_embed"] = state["pos_embed"] + 0.1
    save_file(state, str(tmp_path / "trained.safetensors"))
    with pytest.raises(ValueError, match="not the fixed sin-cos table"):
        vit_jax.load_pretrained(
            str(tmp_path / "trained.safetensors"), posemb="sincos2d", posemb_covers_prefix=False,
            num_heads=4,
        )  # fmt: skip


# --- timm: config.json, the create_model call, names ------------------------------------------------


def test_timm_export_writes_timms_config_json(tmp_path):
    config, params = model("gap_registers_layerscale_qknorm_fcnorm")
    config = config.replace(gelu_approximate=True)
    vit_jax.save_pretrained(params, str(tmp_path / "hub"), format="timm", model=config,
                            preprocessing=PRE)  # fmt: skip
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["model_args"] == dict(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, global_pool="avg", embed_dim=32,
        depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True, qk_norm=True, init_values=1e-5,
        class_token=False, reg_tokens=4, no_embed_class=True, fc_norm=True, act_layer="gelu_tanh",
    )  # fmt: skip
    assert hub["pretrained_cfg"]["mean"] == list(PRE.mean)
    assert hub["pretrained_cfg"]["std"] == list(PRE.std)
    assert hub["pretrained_cfg"]["input_size"] == [3, 16, 16]
    call = timm.how_to_load(str(tmp_path / "hub"), config)
    assert "timm.create_model('vit_base_patch16_224', pretrained=False, img_size=16," in call
    assert "act_layer='gelu_tanh'" in call
    assert f"load_checkpoint(model, '{tmp_path}/hub/model.safetensors')" in call
    # Without our metadata (a file timm wrote), timm's config.json alone rebuilds the model,
    # tanh GELU included.
    weights = tmp_path / "hub" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))
    loaded = load.load_checkpoint(str(tmp_path / "hub"))
    assert loaded.config.replace(layerscale_init=1e-5) == config
    assert loaded.preprocessing.mean == PRE.mean and loaded.preprocessing.std == PRE.std


def test_timm_file_export_writes_its_config_beside_it(tmp_path):
    config, params = model("token_learned_tanh")
    config = config.replace(layernorm_epsilon=1e-6)
    vit_jax.save_pretrained(params, str(tmp_path / "d.safetensors"), format="timm", model=config)
    hub = json.loads((tmp_path / "d.config.json").read_text())
    assert hub["architecture"] == "vit_base_patch16_224" and hub["model_args"]["embed_dim"] == 32


def test_timm_mlp_ratio_builds_exactly_mlp_dim():
    """timm builds the MLP as int(dim * mlp_ratio): the written ratio must never round below."""
    assert int(352 * (960 / 352)) == 959  # the plain quotient, as it used to be written
    for hidden in range(32, 1025, 32):
        for mlp in range(16, 4097, 16):
            ratio = timm_config.mlp_ratio(hidden, mlp)
            assert int(hidden * ratio) == mlp, (hidden, mlp, ratio)
            assert abs(ratio - mlp / hidden) <= 4 * math.ulp(mlp / hidden)  # the nearest such
    config = vit_jax.get_config(**{**SMALL, "hidden_size": 352, "mlp_dim": 960, "num_heads": 4})
    written = json.loads(json.dumps(timm_config.hub_config(config, PRE)))["model_args"]["mlp_ratio"]
    assert int(352 * written) == 960  # survives the JSON round trip


@pytest.mark.parametrize(
    "name, expected",
    [  # facts from timm's model registry (timm/models/vision_transformer.py, deit.py)
        ("deit_tiny_patch16_224", dict(hidden_size=192, num_heads=3, num_layers=12)),
        ("deit3_small_patch16_224.fb_in1k", dict(num_heads=6, layerscale_init=1e-6)),
        ("vit_betwixt_patch16_reg4_gap_256", dict(hidden_size=640, num_heads=10, num_registers=4)),
        ("vit_wee_patch16_reg1_gap_256", dict(hidden_size=256, mlp_dim=1280, num_layers=14)),
        ("vit_medium_patch16_reg4_gap_256", dict(hidden_size=512, num_heads=8, pool="gap")),
        ("vit_so400m_patch14_siglip_224", dict(mlp_dim=4304, pool="map", gelu_approximate=False)),
        ("vit_so400m_patch16_siglip_256", dict(num_layers=27, gelu_approximate=True)),
        ("vit_base_patch16_siglip_gap_224", dict(pool="gap", fc_norm=False, class_token=False)),
    ],
)
def test_timm_model_names(name, expected):
    fields = timm_config.parse_timm_name(name)
    assert {k: fields[k] for k in expected} == expected
    vit_jax.get_config(**fields)  # a valid model


def test_timm_names_that_we_cannot_build_say_so():
    with pytest.raises(ValueError, match="clip"):
        timm_config.parse_timm_name("vit_base_patch16_clip_224")


def test_distilled_deit_names_bring_the_distillation_token():
    fields = timm_config.parse_timm_name("deit_base_distilled_patch16_224")
    assert fields["distillation_token"] and fields["hidden_size"] == 768
    vit_jax.get_config(**fields)  # a valid model


def test_deit_name_brings_imagenet_normalization(tmp_path):
    config = vit_jax.get_config(**{**SMALL, "gelu_approximate": False})
    tensors = timm.from_ours(transfer.flatten(random_params(config)), config)
    save_file(tensors, str(tmp_path / "deit.safetensors"))  # a bare timm file, no config
    loaded = load.load_checkpoint(
        str(tmp_path / "deit.safetensors"), variant="deit_tiny_patch16_224",
        hidden_size=32, num_heads=4, num_layers=2, mlp_dim=64, patch_size=4, image_size=16,
    )  # fmt: skip
    assert loaded.preprocessing.mean == input_convention.IMAGENET_MEAN


def test_mean_std_gives_one_value_per_model_channel():
    rgb = input_convention.Preprocessing(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    mean, std = rgb.mean_std(3, 255.0)  # pixel units
    np.testing.assert_allclose(mean, [102.0, 127.5, 153.0], rtol=1e-6)
    np.testing.assert_allclose(std, [51.0, 63.75, 76.5], rtol=1e-6)
    gray_mean, gray_std = rgb.mean_std(1)  # a gray model: the mean of the RGB statistics
    np.testing.assert_allclose([gray_mean[0], gray_std[0]], [0.5, 0.25], rtol=1e-6)
    one = input_convention.Preprocessing(mean=(0.5,), std=(0.5,)).mean_std(3)
    assert [a.tolist() for a in one] == [[0.5] * 3, [0.5] * 3]


# --- Preprocessing from foreign configs ---------------------------------------------------------------


def test_hf_preprocessor_config_mean_std_are_used(tmp_path):
    config, params = model("token_learned_tanh")
    vit_jax.save_pretrained(params, str(tmp_path / "hf"), format="hf", model=config,
                            preprocessing=PRE)  # fmt: skip
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(PRE.mean) and processor["size"] == {
        "height": 16,
        "width": 16,
    }
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hf_config["vit_jax"]  # as HF itself writes it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    loaded = load.load_checkpoint(str(tmp_path / "hf"))
    assert (loaded.preprocessing.mean, loaded.preprocessing.std) == (PRE.mean, PRE.std)
    white = np.full((16, 16, 3), 255, np.uint8)
    x = loaded.preprocessing.apply(white, (16, 16), 3)
    np.testing.assert_allclose(x[0, 0], (1 - np.array(PRE.mean)) / np.array(PRE.std), rtol=1e-6)


def test_guessed_settings_are_warned(tmp_path, caplog):
    config, params = model("map_no_bias_no_posemb")
    tensors = timm.from_ours(transfer.flatten(params), config)
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # no posemb, no config: size unknown
    with caplog.at_level("WARNING", logger="vit_jax"):
        loaded = load.load_checkpoint(str(tmp_path / "bare.safetensors"), num_heads=4)
    assert loaded.config.image_size == (224, 224)
    assert "guessed image_size=[224, 224]" in caplog.text
    assert "guessed the input convention" in caplog.text


def test_layout_sincos_table_matches_the_model():
    config = vit_jax.get_config(**SMALL, pool="gap", posemb="sincos2d")
    assert layout.sincos_table(config).shape == (1, 16, 32)


# --- Destinations: nothing overwritten, suffixes checked, parents created, no .partial left -------


def save(path, fmt, **kwargs):
    config, params = model("token_learned_tanh")
    return vit_jax.save_pretrained(params, str(path), format=fmt, model=config, **kwargs)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    "fmt, name, kept, refusal",
    [  # an unknown suffix (.txt) is allowed, but not over a file
        ("npz", "notes.txt", "notes.txt", "notes.txt already exists"),
        ("timm", "d.safetensors", "d.safetensors", "d.safetensors already exists"),
        ("timm", "d.safetensors", "d.config.json", "d.config.json already exists"),  # beside it
        ("timm", "hub", "hub/config.json", "hub is a folder that is not empty"),
        ("hf", "hf", "hf/model.safetensors", "hf is a folder that is not empty"),
    ],
)
def test_existing_destination_is_refused_unless_overwrite(fmt, name, kept, refusal, tmp_path):
    (tmp_path / kept).parent.mkdir(exist_ok=True)
    (tmp_path / kept).write_text("the user's own\n")
    with pytest.raises(ValueError, match=f"{tmp_path}/{refusal}; refusing .*overwrite=True"):
        save(tmp_path / name, fmt)
    assert (tmp_path / kept).read_text() == "the user's own\n"
    assert files_under(tmp_path) == sorted({kept, os.path.dirname(kept)} - {""})
    save(tmp_path / name, fmt, overwrite=True)
    assert load.load_checkpoint(str(tmp_path / name)).config == model("token_learned_tanh")[0]


@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_an_empty_folder_is_written_into(fmt, tmp_path):
    (tmp_path / "out").mkdir()
    save(tmp_path / "out", fmt)
    assert "model.safetensors" in files_under(tmp_path / "out")


@pytest.mark.parametrize(
    "fmt, name, message",
    [
        ("npz", "x.safetensors", "format 'npz' writes a .npz file, not a .safetensors file"),
        ("npz", "x", "format 'npz' writes a .npz file, not a folder"),
        (
            "timm",
            "x.npz",
            "format 'timm' writes a .safetensors file or a folder .no suffix., not a",
        ),
        ("hf", "x.safetensors", "format 'hf' writes a folder .no suffix., not a .safetensors"),
    ],
)
def test_suffix_of_another_format_is_refused(fmt, name, message, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / name}: {message}"):
        save(tmp_path / name, fmt)
    assert not list(tmp_path.iterdir())


def test_folder_where_a_file_goes_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "empty.npz").mkdir()
    (tmp_path / "hf").write_text("a file\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty.npz'} is a folder; format 'npz'"):
        save(tmp_path / "empty.npz", "npz", overwrite=True)
    with pytest.raises(ValueError, match=f"{tmp_path / 'hf'} is a file; format 'hf' writes a"):
        save(tmp_path / "hf", "hf", overwrite=True)
    assert files_under(tmp_path) == ["empty.npz", "hf"]


@pytest.mark.parametrize("fmt, name", [("npz", "m.npz"), ("timm", "m.safetensors"), ("hf", "m")])
def test_missing_parent_folders_are_created(fmt, name, tmp_path):
    path = tmp_path / "new" / "deeper" / name
    save(path, fmt)
    assert load.load_checkpoint(str(path)).config == model("token_learned_tanh")[0]


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(tmp_path / "m.npz", "npz")
    assert not list(tmp_path.iterdir())


def test_command_line_refuses_an_existing_destination_before_reading(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    missing = str(tmp_path / "no_such_source.npz")  # not read: the destination is checked first
    assert convert_cli.main([missing, str(notes), "--to", "npz"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"FATAL ValueError: {notes} already exists") and "--overwrite" in err
    assert notes.read_text() == "my notes\n"
    source = str(FIXTURES / "vit_jax_gap" / "params.npz")
    assert convert_cli.main([source, str(notes), "--to", "npz", "--overwrite"]) == 0
    assert load.load_checkpoint(str(notes)).config == load.load_checkpoint(source).config
