"""convert: format detection, bad input, overrides, foreign-layout variants, Orbax, http, and the CLI."""

import functools
import http.server
import json
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from helpers import FIXTURES, REPO, assert_params_identical, logits_of, subprocess_env
from safetensors.numpy import load_file, save_file

import vit_jax
from vit_jax.interop import save
from vit_jax.interop.formats import timm_config
from vit_jax.model import transfer
from vit_jax.tools import convert as convert_cli

POSEMB = transfer.POSEMB_KEY


def fixture(name, weights=""):
    return str(FIXTURES / name / weights)


@functools.cache
def vit_jax_token():
    return vit_jax.load_pretrained(fixture("vit_jax_token_prelogits", "params.npz"))


def flat(tree):
    return transfer.flatten(tree)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear ValueError, no model.


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not weights\n")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        vit_jax.load_pretrained(str(path))


def test_npy_array_is_not_a_checkpoint(tmp_path):
    np.save(tmp_path / "images.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="is not a checkpoint"):
        vit_jax.load_pretrained(str(tmp_path / "images.npy"))


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint"):
        vit_jax.load_pretrained(str(tmp_path))


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        vit_jax.load_pretrained("/nonexistent/model.npz")


@pytest.mark.parametrize(
    "name, weights", [("vit_jax_gap", "params.npz"), ("timm_token", "model.safetensors")]
)
def test_truncated_file(name, weights, tmp_path):
    data = pathlib.Path(fixture(name, weights)).read_bytes()
    path = tmp_path / weights
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        vit_jax.load_pretrained(str(path), num_heads=4)


def test_truncated_hf_folder(tmp_path):
    shutil.copytree(fixture("hf_vit"), tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        vit_jax.load_pretrained(str(tmp_path / "hf"))


def test_npz_variant_mismatch_names_first_key_and_both_shapes():
    with pytest.raises(ValueError) as error:
        vit_jax.load_pretrained(fixture("vit_jax_gap", "params.npz"), variant="ViT-B/16")
    message = str(error.value)
    assert "'embedding/kernel' has shape (4, 4, 3, 32)" in message
    assert "expects (16, 16, 3, 768)" in message


def test_timm_variant_mismatch_names_the_timm_key_too():
    with pytest.raises(ValueError) as error:
        vit_jax.load_pretrained(
            fixture("timm_token", "model.safetensors"), variant="vit_small_patch16_224"
        )
    message = str(error.value)
    assert "'embedding/kernel' has shape (4, 4, 3, 32)" in message and "(16, 16, 3, 384)" in message
    assert "'patch_embed.proj.weight'" in message


def test_override_mismatch_inside_the_blocks():
    with pytest.raises(ValueError) as error:
        vit_jax.load_pretrained(fixture("hf_vit"), mlp_dim=128)
    message = str(error.value)
    assert "'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' has shape (32, 64)" in message
    assert "expects (32, 128)" in message
    assert "'vit.encoder.layer.0.intermediate.dense.weight'" in message


def test_heads_that_disagree_with_jax_kernels():
    with pytest.raises(ValueError, match=r"query/kernel' has shape \(32, 4, 8\).*\(32, 2, 16\)"):
        vit_jax.load_pretrained(fixture("vit_jax_gap", "params.npz"), num_heads=2)


def test_timm_without_heads_says_how_to_give_them():
    with pytest.raises(ValueError, match="num_heads=.*variant="):
        vit_jax.load_pretrained(fixture("timm_token", "model.safetensors"))


def test_unknown_timm_key_is_named(tmp_path):
    state = load_file(fixture("timm_token", "model.safetensors"))
    state["norm_pre.weight"] = np.ones(32, np.float32)  # CLIP-style pre-norm: not in our model
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match="'norm_pre.weight'.*no counterpart"):
        vit_jax.load_pretrained(str(tmp_path / "clip.safetensors"), num_heads=4)


def test_missing_parameter_is_named(tmp_path):
    arrays = dict(np.load(fixture("vit_jax_gap", "params.npz")))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ValueError, match="'Transformer/encoderblock_1/LayerNorm_2/scale'.*missing"):
        vit_jax.load_pretrained(str(tmp_path / "broken.npz"))


# ---------------------------------------------------------------------------------------------
# Overrides: a new resolution or class count adapts; the rest stays.


def test_image_size_and_num_classes_overrides_adapt():
    _, base = vit_jax_token()
    model, params = vit_jax.load_pretrained(
        fixture("vit_jax_token_prelogits", "params.npz"), image_size=24, num_classes=5
    )
    assert model.config.image_size == (24, 24) and model.config.num_classes == 5
    new, old = flat(params), flat(base)
    assert new[POSEMB].shape == (1, 1 + 36, 32)
    np.testing.assert_array_equal(new[POSEMB][:, :1], old[POSEMB][:, :1])  # class row kept
    np.testing.assert_array_equal(new["head/kernel"], np.zeros((32, 5)))
    np.testing.assert_array_equal(new["pre_logits/kernel"], old["pre_logits/kernel"])
    assert logits_of(model.config, params, np.zeros((2, 24, 24, 3), np.float32)).shape == (2, 5)


def test_published_optimizer_and_big_vision_prefixes(tmp_path):
    config, params = vit_jax_token()
    arrays = {k: np.asarray(v) for k, v in flat(params).items()}
    for prefix in ("opt/target/", "params/"):
        junk = {f"opt/state/{k}": v for k, v in arrays.items() if k.startswith("head")}
        np.savez(tmp_path / "old.npz", **{prefix + k: v for k, v in arrays.items()}, **junk)
        model, loaded = vit_jax.load_pretrained(str(tmp_path / "old.npz"))
        assert model.config == config.config
        assert_params_identical(loaded, params)


def test_non_square_grid_needs_and_uses_image_size(tmp_path):
    config, params = vit_jax_token()
    wide = config.config.replace(image_size=(16, 20))  # 1 + 4x5 rows: neither part is square
    adapted = transfer.adapt_params(params, config.config, wide)
    vit_jax.save_pretrained(adapted, str(tmp_path / "wide.npz"), model=wide)
    model, loaded = vit_jax.load_pretrained(str(tmp_path / "wide.npz"))  # ours: it says the size
    assert model.config == wide
    np.savez(tmp_path / "foreign.npz", **np.load(tmp_path / "wide.npz"))  # same arrays, no config
    with pytest.raises(ValueError, match="not a square patch grid; pass image_size"):
        vit_jax.load_pretrained(str(tmp_path / "foreign.npz"))
    model, loaded = vit_jax.load_pretrained(str(tmp_path / "foreign.npz"), image_size=(16, 20))
    assert model.config == wide
    assert_params_identical(loaded, adapted)


# ---------------------------------------------------------------------------------------------
# Foreign-layout options that the fixtures do not cover.


def test_timm_no_embed_class_and_back(tmp_path):
    state = load_file(fixture("timm_token", "model.safetensors"))
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm no_embed_class: patch rows only
    save_file(state, str(tmp_path / "noembed.safetensors"))
    model, params = vit_jax.load_pretrained(str(tmp_path / "noembed.safetensors"), num_heads=4)
    assert model.config.has_class_token and not model.config.posemb_covers_prefix
    for fmt, name in (("timm", "again.safetensors"), ("npz", "again.npz")):
        vit_jax.save_pretrained(params, str(tmp_path / name), format=fmt, model=model)
        again, reloaded = vit_jax.load_pretrained(
            str(tmp_path / name), **save.reload_overrides(params, model.config, fmt)
        )
        assert again.config == model.config
        assert_params_identical(reloaded, params)
    assert "pos_embedding" in np.load(tmp_path / "again.npz")  # big_vision's name for it
    with pytest.raises(ValueError, match="does not cover the class token"):
        vit_jax.save_pretrained(params, str(tmp_path / "hf"), format="hf", model=model)


def test_timm_hub_folder_and_wrapped_state_dict(tmp_path):
    state = load_file(fixture("timm_token", "model.safetensors"))
    (tmp_path / "hub").mkdir()
    save_file(state, str(tmp_path / "hub" / "model.safetensors"))
    hub = {"architecture": "vit_tiny_patch4_16", "model_args": {"num_heads": 4, "img_size": 16}}
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hub))
    model, params = vit_jax.load_pretrained(str(tmp_path / "hub"))
    expected = np.load(fixture("timm_token", "logits.npy"))
    images = np.load(fixture("timm_token", "images.npy"))
    assert np.abs(logits_of(model.config, params, images) - expected).max() <= 1e-4
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.safetensors"))
    _, wrapped = vit_jax.load_pretrained(str(tmp_path / "ddp.safetensors"), num_heads=4)
    assert_params_identical(wrapped, params)


def test_timm_names_parse_to_variants():
    assert timm_config.parse_timm_name("vit_base_patch16_224.augreg_in21k") == dict(
        hidden_size=768,
        mlp_dim=3072,
        num_heads=12,
        num_layers=12,
        patch_size=(16, 16),
        image_size=224,
    )
    assert timm_config.parse_timm_name("vit_small_patch14_reg4_dinov2.lvd142m")["num_heads"] == 6
    assert timm_config.parse_timm_name("resnet50") is None


def test_hf_vit_model_with_pooler_round_trip(tmp_path):
    # No head, pre-logits kept: HF's ViTModel, whose pooler (Dense + tanh) is our pre-logits.
    model, params = vit_jax.load_pretrained(
        fixture("vit_jax_token_prelogits", "params.npz"), num_classes=0
    )
    config = model.config
    assert "head" not in params and config.representation_size == 32
    vit_jax.save_pretrained(params, str(tmp_path / "hf"), format="hf", model=config)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["ViTModel"]
    keys = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "pooler.dense.weight" in keys and not any(k.startswith("vit.") for k in keys)
    model, loaded = vit_jax.load_pretrained(str(tmp_path / "hf"))
    assert model.config == config
    assert_params_identical(loaded, params)


def test_map_head_qk_norm_no_bias_through_timm(tmp_path):
    # timm's attn_pool (q + fused kv) is big_vision's MAPHead; no fixture has it with learned posemb.
    config = vit_jax.get_config(
        image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=1,
        num_classes=3, pool="map", qk_norm=True, qkv_bias=False, gelu_approximate=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = vit_jax.model.vit.param_shapes(vit_jax.VisionTransformer(config))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    vit_jax.save_pretrained(params, str(tmp_path / "map.safetensors"), format="timm", model=config)
    state = load_file(str(tmp_path / "map.safetensors"))
    assert state["attn_pool.kv.weight"].shape == (64, 32) and "blocks.0.attn.qkv.bias" not in state
    model, loaded = vit_jax.load_pretrained(str(tmp_path / "map.safetensors"))
    assert model.config == config  # heads from the q_norm weights
    assert_params_identical(loaded, params)


def test_torch_pickle_needs_torch(tmp_path):
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed; the error is for machines without it")
    except ImportError:
        pass
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="PyTorch pickle: reading it needs torch"):
        vit_jax.load_pretrained(str(tmp_path / "model.pth"))


def test_save_refuses_params_that_do_not_fit(tmp_path):
    config, params = vit_jax_token()
    with pytest.raises(ValueError, match="'embedding/kernel'.*expects"):
        vit_jax.save_pretrained(
            params, str(tmp_path / "x.npz"), model=config.config.replace(hidden_size=64)
        )
    with pytest.raises(ValueError, match="format="):
        vit_jax.save_pretrained(params, str(tmp_path / "x"), format="caffe", model=config)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Our own Orbax checkpoints, http(s), and the command line.


def test_orbax_checkpoint_of_training(tmp_path):
    from vit_jax import checkpoints

    config, params = vit_jax_token()
    manager = checkpoints.TrainCheckpoints(tmp_path / "checkpoints", async_save=False)
    state = {"params": params, "opt_state": {}, "step": np.asarray(7)}
    manager.save(7, state, config.config, {"step": 7})
    manager.close()
    model, loaded = vit_jax.load_pretrained(str(tmp_path), num_classes=3)
    assert model.config == config.config.replace(num_classes=3)
    assert_params_identical(
        {k: v for k, v in loaded.items() if k != "head"},
        {k: v for k, v in params.items() if k != "head"},
    )


def test_http_download_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=fixture("vit_jax_gap")
    )
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/params.npz"
        model, params = vit_jax.load_pretrained(url)
        assert model.config.pool == "gap"
        assert len(list((tmp_path / "cache").rglob("params.npz"))) == 1
    finally:
        server.shutdown()
    _, again = vit_jax.load_pretrained(url)  # served from the cache, the server is gone
    assert_params_identical(again, params)


def test_command_line_converts_timm_to_hf(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "vit_jax.tools.convert",
            fixture("timm_token", "model.safetensors"), str(tmp_path / "hf"),
            "--to", "hf", "--set", "num_heads=4",
        ],
        cwd=REPO, capture_output=True, text=True, check=False,
        env=subprocess_env(PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    model, params = vit_jax.load_pretrained(str(tmp_path / "hf"))
    images = np.load(fixture("timm_token", "images.npy"))
    expected = np.load(fixture("timm_token", "logits.npy"))
    assert np.abs(logits_of(model.config, params, images) - expected).max() <= 1e-4


def test_command_line_reports_errors_without_traceback(tmp_path, capsys):
    code = convert_cli.main(
        [fixture("timm_token", "model.safetensors"), str(tmp_path / "x.npz"), "--to", "npz"]
    )  # the heads are missing: the source cannot be read
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("FATAL ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_big_vision_two_tower_image_encoder(tmp_path):
    arrays = dict(np.load(fixture("big_vision_map_sincos2d", "params.npz")))
    tower = {f"params/img/{k}": v for k, v in arrays.items()}
    tower["params/txt/Encoder_0/encoder_norm/scale"] = np.ones(32, np.float32)  # the text tower
    tower["params/t"] = np.ones(1, np.float32)
    np.savez(tmp_path / "siglip.npz", **tower)
    model, params = vit_jax.load_pretrained(str(tmp_path / "siglip.npz"))
    _, expected = vit_jax.load_pretrained(fixture("big_vision_map_sincos2d", "params.npz"))
    assert model.config.pool == "map"
    assert_params_identical(params, expected)


def test_command_line_hints_are_valid_shell(tmp_path, capsys):
    import shlex

    convert_cli.main(
        [fixture("vit_jax_gap", "params.npz"), str(tmp_path / "t.safetensors"), "--to", "timm"]
    )
    out = capsys.readouterr().out
    assert "timm.create_model(" in out and "timm.models.load_checkpoint(model" in out
    hint = next(line for line in out.splitlines() if "must be told" in line)
    words = shlex.split(hint.split("told: ")[1].split(" (vit_jax")[0])  # what a shell passes on
    settings = dict(w.split("=", 1) for w in words if w != "--set")
    _, params = vit_jax.load_pretrained(fixture("vit_jax_gap", "params.npz"))
    config = vit_jax.load_pretrained(fixture("vit_jax_gap", "params.npz"))[0].config
    expected = save.reload_overrides(params, config, "timm")
    assert {k: convert_cli.parse_value(v) for k, v in settings.items()} == expected
    # A tuple value survives the shell: the hint that failed when pasted.
    wide = {"image_size": [32, 32], "pool": "gap"}
    words = shlex.split(convert_cli.set_flags(wide))
    assert [convert_cli.parse_value(w.split("=", 1)[1]) for w in words[1::2]] == [(32, 32), "gap"]
