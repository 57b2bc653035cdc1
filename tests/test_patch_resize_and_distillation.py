"""FlexiViT's PI-resize (loading a checkpoint at another patch size) and DeiT's distillation token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, logits_of

import vit_jax
from vit_jax.model import flexi, transfer
from vit_jax.train import state as state_lib

SMALL = dict(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2)
FLEXI = FIXTURES / "flexi_patch4_to_patch2" / "params.npz"


def _upsample_patches(images, old, new):
    """Each old×old patch resized to new×new on its own (the resize PI-resize inverts)."""
    b, h, w, c = images.shape
    gh, gw = h // old, w // old
    patches = images.reshape(b, gh, old, gw, old, c).transpose(0, 1, 3, 2, 4, 5)
    up = jax.image.resize(
        jnp.asarray(patches), (b, gh, gw, new, new, c), method="bilinear", antialias=False
    )
    return np.asarray(up).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * new, gw * new, c)


def test_resize_matrix_is_the_bilinear_resize():
    r = flexi.resize_matrix((3, 3), (5, 5))
    patch = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    direct = jax.image.resize(patch, (5, 5), method="bilinear", antialias=False)
    np.testing.assert_allclose(r @ patch.ravel(), np.asarray(direct).ravel(), atol=1e-6)


def test_pi_resize_keeps_the_embedding_of_an_upsampled_patch():
    """<R x, pinv(Rᵀ) w> = <x, w> exactly when Rᵀ has full row rank (new patch ≥ old)."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(4, 4, 3, 8)).astype(np.float32)
    x = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
    new = flexi.pi_resize_kernel(kernel, (7, 7))
    assert new.shape == (7, 7, 3, 8) and new.dtype == kernel.dtype
    up = _upsample_patches(x, 4, 7)
    np.testing.assert_allclose(
        np.einsum("bhwc,hwcd->bd", up, new), np.einsum("bhwc,hwcd->bd", x, kernel), atol=1e-4
    )


def test_a_model_at_a_larger_patch_keeps_its_function_on_upsampled_patches():
    config = vit_jax.get_config(**SMALL, num_classes=10)
    rng = np.random.default_rng(2)
    shapes = vit_jax.model.vit.param_shapes(vit_jax.VisionTransformer(config))
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, shapes)
    bigger = config.replace(patch_size=(8, 8), image_size=(32, 32))  # the same 4×4 grid
    adapted = transfer.adapt_params(params, config, bigger)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(
        logits_of(bigger, adapted, _upsample_patches(images, 4, 8)),
        logits_of(config, params, images),
        atol=1e-4,
    )


def test_init_from_takes_the_models_patch_size():
    """`config.init_from` with `--config.model.patch_size=2`: the same PI-resized params as loading."""
    _, loaded = vit_jax.load_pretrained(str(FLEXI), patch_size=2, image_size=8)
    config = vit_jax.get_config(
        **{**SMALL, "patch_size": 2, "image_size": 8}, num_classes=10, gelu_approximate=True
    )
    params = state_lib.load_init_params(str(FLEXI), config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"patch_size": 0}, r"patch_size=\(0, 0\)"),
        ({"patch_size": -2}, r"patch_size=\(-2, -2\)"),
        ({"patch_size": 3}, r"image_size=\(16, 16\) is not divisible by patch_size=\(3, 3\)"),
        ({"patch_size": 4, "image_size": 10}, r"image_size=\(10, 10\).*patch_size=\(4, 4\)"),
    ],
)
def test_bad_patch_sizes_are_refused_naming_both_sizes(overrides, named):
    with pytest.raises(ValueError, match=named):
        vit_jax.load_pretrained(str(FLEXI), **overrides)


@pytest.fixture(scope="module")
def distilled():
    config = vit_jax.get_config(**SMALL, num_classes=10, distillation_token=True)
    model = vit_jax.create_model(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.3, params)
    images = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    return model, params, images


def test_distilled_model_has_the_token_its_posemb_row_and_a_second_head(distilled):
    model, params, _ = distilled
    assert params["dist"].shape == (1, 1, 32)
    assert params["head_dist"]["kernel"].shape == (32, 10)
    grid = model.config.grid_size
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (
        1,
        2 + grid[0] * grid[1],
        32,
    )


def test_distilled_output_is_the_mean_of_both_heads(distilled):
    model, params, images = distilled
    logits, aux = model.apply({"params": params}, images, return_intermediates=True)
    cls_logits, dist_logits = aux["head_logits"]
    encoded = aux["encoded"]
    head, head_dist = params["head"], params["head_dist"]
    np.testing.assert_allclose(
        cls_logits, encoded[:, 0] @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        dist_logits, encoded[:, 1] @ head_dist["kernel"] + head_dist["bias"], rtol=1e-5, atol=1e-5
    )
    assert np.abs(cls_logits - dist_logits).max() > 1e-2  # two distinct heads
    np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.apply({"params": params}, images), logits)


@pytest.mark.parametrize(
    "overrides", [dict(pool="gap"), dict(representation_size=16), dict(fc_norm=True)]
)
def test_distillation_token_needs_deits_head(overrides):
    with pytest.raises(ValueError, match="distillation_token=True.*allowed only pool='token'"):
        vit_jax.get_config(**SMALL, distillation_token=True, **overrides)


def test_a_distilled_checkpoint_without_its_second_head_is_refused_naming_it(tmp_path):
    from safetensors.numpy import save_file

    from vit_jax.interop.formats import source

    state = source.read_safetensors(str(FIXTURES / "timm_deit_distilled" / "model.safetensors"))
    path = str(tmp_path / "no_head_dist.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("head_dist")}, path)
    with pytest.raises(ValueError, match="'head_dist/kernel' .* is missing from the checkpoint"):
        vit_jax.load_pretrained(path, num_heads=4)


def test_convert_and_predict_take_another_patch_size(tmp_path, capsys):
    from PIL import Image

    from vit_jax.tools import convert as convert_cli
    from vit_jax.tools import predict as predict_cli

    at_patch_2 = ["--set", "patch_size=2", "--set", "image_size=8"]
    out = tmp_path / "p2.npz"
    assert convert_cli.main([str(FLEXI), str(out), "--to", "npz", *at_patch_2]) == 0
    model, params = vit_jax.load_pretrained(str(out))
    assert model.config.patch_size == (2, 2) and model.config.image_size == (8, 8)
    images = np.load(FLEXI.parent / "images.npy")  # what timm's own loader was fed at patch 2
    expected = np.load(FLEXI.parent / "logits.npy")
    assert np.abs(logits_of(model.config, params, images) - expected).max() <= 1e-4

    pixels = np.round((images[0] + 1) * 127.5).astype(np.uint8)  # an 8x8 RGB image file
    png = str(tmp_path / "x.png")
    Image.fromarray(pixels).save(png)
    capsys.readouterr()
    assert predict_cli.main(["--checkpoint", str(FLEXI), *at_patch_2, "--top_k", "1", png]) == 0
    top1 = int(np.argmax(logits_of(model.config, params, images[:1])[0]))
    assert capsys.readouterr().out.strip().splitlines()[1].split()[-1] in (str(top1), f"[{top1}]")
