"""Attention weights, rollout and the plots over the image (vit_jax/model/visualize.py)."""

import matplotlib

matplotlib.use("Agg")  # Before anything draws: the tests run headless.

import jax
import numpy as np
import pytest
from helpers import TINY, random_params

import vit_jax
from vit_jax.model import visualize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def token_model():
    model = vit_jax.create_model(None, **TINY, num_classes=10, num_registers=2)
    return model, random_params(model, scale=0.3)


@pytest.fixture(scope="module")
def images():
    return np.asarray(jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1))


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{path} is not a non-empty PNG"


def drawn_colours(fig) -> list[int]:
    """For every image a figure draws (maps, patches, heatmaps): how many distinct colours it shows.

    A blank figure draws no image; a map drawn in one flat colour shows 1.
    """
    counts = []
    for ax in fig.axes:
        for image in ax.get_images():
            rgba = image.to_rgba(image.get_array(), bytes=True).reshape(-1, 4)
            visible = rgba[rgba[:, 3] > 0]
            counts.append(len(np.unique(visible, axis=0)))
    return counts


# --- Rollout, checked by hand -----------------------------------------------------------------------


def test_rollout_of_identity_attention_is_identity():
    attention = np.broadcast_to(np.eye(5), (3, 2, 4, 5, 5))  # (L, B, heads, T, T)
    np.testing.assert_allclose(
        visualize.attention_rollout(attention), np.broadcast_to(np.eye(5), (2, 5, 5))
    )


def test_rollout_two_layers_by_hand():
    first = np.array([[1.0, 0.0], [0.5, 0.5]])
    second = np.array([[0.5, 0.5], [0.0, 1.0]])
    # One head per layer: Â = (A + I) / 2 after renormalizing, rollout = Â_2 @ Â_1.
    #   Â_1 = [[1, 0], [.25, .75]], Â_2 = [[.75, .25], [0, 1]]
    expected = np.array([[0.8125, 0.1875], [0.25, 0.75]])
    attention = np.stack([first, second])[:, None]  # (L=2, heads=1, T, T)
    np.testing.assert_allclose(visualize.attention_rollout(attention), expected, atol=1e-7)


def test_rollout_averages_heads_before_adding_identity():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 1.0], [0.0, 1.0]])
    attention = np.stack([a, b])[None]  # one layer, two heads; their mean is uniform 0.5
    expected = (np.full((2, 2), 0.5) + np.eye(2)) / 2
    np.testing.assert_allclose(visualize.attention_rollout(attention), expected, atol=1e-7)


def test_rollout_rows_sum_to_one_for_random_attention():
    logits = np.random.default_rng(0).normal(size=(4, 3, 2, 7, 7))
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for fusion in ("mean", "max", "min"):
        rollout = visualize.attention_rollout(attention, head_fusion=fusion)
        assert rollout.shape == (3, 7, 7)
        np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)
        assert (rollout >= 0).all()


def test_rollout_rejects_bad_shapes_and_fusion():
    with pytest.raises(ValueError, match="expected \\(layers"):
        visualize.attention_rollout(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="head_fusion='median'"):
        visualize.attention_rollout(np.ones((1, 1, 3, 3)), head_fusion="median")


def test_class_token_attention_and_rollout_map_pick_the_right_entries():
    grid = (2, 3)
    n_prefix = 2
    tokens = n_prefix + 6
    matrix = np.arange(tokens * tokens, dtype=np.float32).reshape(tokens, tokens)
    cls_map = visualize.class_token_attention(matrix, n_prefix, grid)
    np.testing.assert_array_equal(cls_map, matrix[0, 2:].reshape(2, 3))
    no_cls = visualize.rollout_map(matrix, n_prefix, grid, from_class_token=False)
    np.testing.assert_allclose(no_cls, matrix[2:, 2:].mean(0).reshape(2, 3))
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        visualize.patches_to_grid(np.ones(6), (3, 3))


def test_upsample_keeps_constant_maps_and_sizes():
    up = visualize.upsample(np.full((2, 4, 4), 0.25), (16, 16))
    assert up.shape == (2, 16, 16)
    np.testing.assert_allclose(up, 0.25, atol=1e-6)
    nearest = visualize.upsample(np.eye(2), (4, 4), method="nearest")
    np.testing.assert_array_equal(nearest, np.kron(np.eye(2), np.ones((2, 2))))


# --- From a model -----------------------------------------------------------------------------------


def test_attention_maps_from_a_model(token_model, images):
    model, params = token_model
    maps = visualize.attention_maps(model, params, images)
    tokens = 1 + 2 + 16  # class, two registers, 4x4 patches
    assert maps.attention.shape == (2, 2, 4, tokens, tokens)
    np.testing.assert_allclose(maps.attention.sum(-1), 1.0, atol=1e-5)
    assert maps.rollout.shape == (2, tokens, tokens)
    np.testing.assert_allclose(maps.rollout.sum(-1), 1.0, atol=1e-5)
    assert maps.rollout_map.shape == (2, 4, 4)
    assert maps.class_attention.shape == (2, 2, 4, 4, 4)
    assert maps.grid == (4, 4) and maps.num_prefix_tokens == 3
    np.testing.assert_allclose(maps.logits, model.apply({"params": params}, images), atol=1e-5)
    # The rollout map is the class-token row of the rollout, on the grid.
    np.testing.assert_allclose(maps.rollout_map, maps.rollout[:, 0, 3:].reshape(2, 4, 4))


@pytest.mark.parametrize("class_token", [False, True])
def test_attention_maps_of_mean_pooling_follow_the_patch_tokens(images, class_token):
    overrides = dict(TINY, num_layers=1, num_classes=10, pool="gap", class_token=class_token)
    model = vit_jax.create_model(None, **overrides)
    maps = visualize.attention_maps(model, random_params(model, scale=0.3), images)
    n = int(class_token)
    assert (maps.class_attention is None) == (not class_token)
    # The head averages the patch tokens, so the map averages their rows of the rollout, even when
    # a class token exists (timm's avg-pooled ViTs keep one).
    np.testing.assert_allclose(
        maps.rollout_map, maps.rollout[:, n:, n:].mean(1).reshape(2, 4, 4), atol=1e-6
    )


def test_posemb_similarity_learned_and_sincos(token_model):
    model, params = token_model
    sim = visualize.posemb_similarity(params, model.config)
    assert sim.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(
        [sim[r, c, r, c] for r in range(4) for c in range(4)], 1.0, atol=1e-5
    )
    # Class/register rows are left out: the patch rows are exactly the table's last 16.
    table = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])[0]
    np.testing.assert_allclose(visualize.patch_position_embeddings(params, model.config), table[3:])

    sincos = vit_jax.get_config(
        None, **TINY, pool="gap", posemb="sincos2d", posemb_covers_prefix=False
    )
    sim = visualize.posemb_similarity({}, sincos)
    # Fixed sin-cos embeddings are most similar to themselves and to their neighbours.
    assert sim[1, 1, 1, 1] == pytest.approx(1.0, abs=1e-5)
    assert sim[1, 1, 1, 2] > sim[1, 1, 3, 3]

    with pytest.raises(ValueError, match="no position embeddings"):
        visualize.posemb_similarity({}, sincos.replace(posemb="none"))


# --- Drawings ---------------------------------------------------------------------------------------


def test_to_display_image_conventions():
    np.testing.assert_allclose(visualize.to_display_image(np.full((2, 2, 3), -1.0)), 0.0)
    np.testing.assert_allclose(visualize.to_display_image(np.full((2, 2, 3), 255, np.uint8)), 1.0)
    assert visualize.to_display_image(np.zeros((2, 2, 1))).shape == (2, 2)
    with pytest.raises(ValueError, match="expected \\(height, width, 1 or 3\\)"):
        visualize.to_display_image(np.zeros((2, 2)))


def test_plots_write_png_files(token_model, images, tmp_path):
    model, params = token_model
    maps = visualize.attention_maps(model, params, images)
    figures = {
        "patches": visualize.plot_patches(images[0], 4),
        "sequence": visualize.plot_patch_sequence(images[0], 4, max_patches=8),
        "posemb": visualize.plot_posemb_similarity(
            visualize.posemb_similarity(params, model.config)
        ),
        "rollout": visualize.plot_attention(images[0], maps.rollout_map[0], titles=["rollout"]),
        "heads": visualize.plot_attention(
            images[0],
            maps.class_attention[:, 0],
            titles=[f"head {h}" for h in range(4)],
            row_labels=["layer 0", "layer 1"],
        ),
        "batch": visualize.plot_attention(images, maps.rollout_map[:, None], titles=["rollout"]),
        "gray": visualize.plot_attention(
            np.arange(256, dtype=np.uint8).reshape(16, 16, 1), np.ones((2, 4, 4))
        ),
    }
    for name, fig in figures.items():
        # Not a blank figure: every panel shows an image that is not all one value or all NaN.
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.images]
        assert panels, name
        for ax in panels:
            shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
            assert np.isfinite(shown).any(), name
        shown = [im.get_array().astype(float) for ax in panels for im in ax.images]
        assert any(np.nanstd(x) > 0 for x in shown), name
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert_png(path)
        colours = drawn_colours(fig)
        # Every map drawn shows structure (the gray plot's images are flat black on purpose).
        assert colours and max(colours) > 4, f"{name}: {colours}"
    with pytest.raises(ValueError, match="maps of shape"):
        visualize.plot_attention(images[0], np.ones(4))
    with pytest.raises(ValueError, match="2 images for 3 rows"):
        visualize.plot_attention(images, np.ones((3, 1, 4, 4)))


def test_plot_posemb_similarity_takes_what_posemb_similarity_takes(token_model):
    model, params = token_model
    from_params = visualize.plot_posemb_similarity(params, model.config)
    from_similarity = visualize.plot_posemb_similarity(
        visualize.posemb_similarity(params, model.config)
    )
    a, b = (fig.axes[0].get_images()[0].get_array() for fig in (from_params, from_similarity))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected \\(gh, gw, gh, gw\\)"):
        visualize.plot_posemb_similarity(np.ones((4, 4)))


def test_sincos_similarity_plot_is_not_a_flat_colour():
    sincos = vit_jax.get_config(
        None, **{**TINY, "hidden_size": 256, "image_size": 32}, pool="gap", posemb="sincos2d"
    )  # fmt: skip
    sim = visualize.posemb_similarity({}, sincos)
    fig = visualize.plot_posemb_similarity({}, sincos)
    image = fig.axes[0].get_images()[0]
    assert image.norm.vmin == pytest.approx(float(sim.min()))  # the scale starts at the data
    assert sim.min() > -0.5  # so a fixed -1 would have wasted most of the colour range
    assert drawn_colours(fig)[0] > 20


def test_mean_attention_per_layer_for_mean_pooling(images):
    model = vit_jax.create_model(None, **TINY, num_classes=10, pool="gap")
    maps = visualize.attention_maps(model, random_params(model, scale=0.3), images)
    assert maps.class_attention is None
    assert maps.mean_attention.shape == (2, 2, 4, 4, 4)  # layers, images, heads, grid
    expected = maps.attention.mean(axis=-2).reshape(2, 2, 4, 4, 4)  # no prefix tokens
    np.testing.assert_allclose(maps.mean_attention, expected, atol=1e-6)
    np.testing.assert_allclose(maps.mean_attention.sum((-2, -1)), 1.0, atol=1e-5)
    fig = visualize.plot_attention(images[0], maps.mean_attention[:, 0])
    assert min(drawn_colours(fig)) > 1
