"""What a Vision Transformer looks at: attention weights, attention rollout, and plots over the image.

Arrays first, drawings second:
  `attention_weights(model, params, images)`  → logits and the softmax weights of every layer and head,
                                                (L, B, heads, T, T), T = prefix tokens [class, registers]
                                                + patches;
  `attention_rollout(attention)`              → how much each output token draws on each input token
                                                through all layers (Abnar & Zuidema, 2020);
  `class_token_attention`, `mean_attention`, `rollout_map`
                                              → those weights as maps over the patch grid
                                                (class token's row; or, for mean pooling, the
                                                patch tokens' rows averaged, per layer and head);
  `attention_maps(model, params, images)`     → all of the above at once;
  `posemb_similarity(params, config)`         → cosine similarity of the position embeddings (paper Fig. 7);
                                                `plot_posemb_similarity` takes the same (params,
                                                config), or the similarity it returns.
The `plot_*` helpers draw onto `matplotlib.figure.Figure`s built without pyplot, so they work under any
backend (Agg on a server, inline in a notebook) and never open windows; they return the figure.

Pixel convention: float images are model inputs in [-1, 1]; uint8 images are 0..255.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from vit_jax.model.config import ViTConfig
from vit_jax.model.vit import VisionTransformer, posemb_sincos_2d

Grid = tuple[int, int]


# --- Attention as arrays ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _apply_with_attention(model: VisionTransformer, params, images):
    return model.apply({"params": params}, images, return_attention=True)


def attention_weights(model: VisionTransformer, params, images) -> tuple[np.ndarray, np.ndarray]:
    """(logits (B, classes), attention (L, B, heads, T, T)) for model inputs `images` in [-1, 1].

    `attention[l, b, h, i, j]` is how much token i attends to token j in head h of layer l; every
    row sums to 1. Tokens are ordered [class, registers..., patches in row-major grid order].
    """
    logits, aux = _apply_with_attention(model, params, jnp.asarray(images, jnp.float32))
    return np.asarray(logits), np.asarray(aux["attention"], np.float32)


def fuse_heads(attention: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
    """Combines the heads axis (third from last) of attention weights: 'mean', 'max' or 'min'."""
    reducers = {"mean": np.mean, "max": np.max, "min": np.min}
    if head_fusion not in reducers:
        raise ValueError(f"head_fusion={head_fusion!r}; allowed: {', '.join(reducers)}")
    return reducers[head_fusion](np.asarray(attention, np.float64), axis=-3)


def attention_rollout(attention: np.ndarray, *, head_fusion: str = "mean") -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): (L, ..., heads, T, T) → (..., T, T).

    Per layer: fuse the heads (average, as in the paper), add the identity for the residual
    connection (a token also passes itself on unchanged), and renormalize rows to sum to 1. Then
    multiply across layers, last layer on the left: rollout = Â_L · … · Â_1, so
    `rollout[..., i, j]` is the share of input token j in output token i. Rows sum to 1.
    """
    attention = np.asarray(attention)
    if attention.ndim < 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(
            f"attention of shape {attention.shape}: expected (layers, ..., heads, T, T)"
        )
    fused = fuse_heads(attention, head_fusion)  # (L, ..., T, T)
    with_residual = fused + np.eye(fused.shape[-1])
    with_residual /= with_residual.sum(axis=-1, keepdims=True)
    rollout = with_residual[0]
    for layer in with_residual[1:]:
        rollout = layer @ rollout
    return rollout.astype(np.float32)


def patches_to_grid(values: np.ndarray, grid: Grid) -> np.ndarray:
    """(..., gh*gw) values of the patch tokens → (..., gh, gw), in the model's row-major order."""
    values = np.asarray(values)
    if values.shape[-1] != grid[0] * grid[1]:
        raise ValueError(
            f"{values.shape[-1]} patch values do not fill a {grid[0]}x{grid[1]} grid "
            f"({grid[0] * grid[1]} patches)"
        )
    return values.reshape(*values.shape[:-1], *grid)


def class_token_attention(attention: np.ndarray, num_prefix_tokens: int, grid: Grid) -> np.ndarray:
    """How much the class token (token 0) attends to each patch: (..., T, T) → (..., gh, gw).

    Only meaningful for models with a class token. Keeps every leading axis, so (L, B, heads, T, T)
    gives one map per layer, image and head. The maps omit the share the class token gives to
    itself and the registers, so they sum to at most 1.
    """
    attention = np.asarray(attention)
    return patches_to_grid(attention[..., 0, num_prefix_tokens:], grid)


def mean_attention(attention: np.ndarray, num_prefix_tokens: int, grid: Grid) -> np.ndarray:
    """How much the patch tokens attend to each patch, on average: (..., T, T) → (..., gh, gw).

    What a mean-pooled (gap) head reads is the average of the patch tokens, so this is the per-layer
    counterpart of `class_token_attention` for models without class-token pooling. Keeps every
    leading axis: (L, B, heads, T, T) gives one map per layer, image and head.
    """
    attention = np.asarray(attention)
    rows = attention[..., num_prefix_tokens:, num_prefix_tokens:]
    return patches_to_grid(rows.mean(axis=-2), grid)


def rollout_map(
    rollout: np.ndarray, num_prefix_tokens: int, grid: Grid, *, from_class_token: bool = True
) -> np.ndarray:
    """The patches' share in what the head sees, from a rollout: (..., T, T) → (..., gh, gw).

    With class-token pooling the head reads token 0, so its row is the answer. Otherwise (mean or
    MAP pooling, with or without a class token) the head reads the patch tokens, so we average their
    rows: exact for mean pooling, an approximation for a MAP head, whose own attention the encoder
    does not report.
    """
    rollout = np.asarray(rollout)
    if from_class_token:
        relevance = rollout[..., 0, num_prefix_tokens:]
    else:
        relevance = rollout[..., num_prefix_tokens:, num_prefix_tokens:].mean(axis=-2)
    return patches_to_grid(relevance, grid)


def upsample(maps: np.ndarray, size: Sequence[int], method: str = "bilinear") -> np.ndarray:
    """(..., gh, gw) patch-grid maps → (..., H, W) at image resolution ('bilinear' or 'nearest')."""
    maps = np.asarray(maps, np.float32)
    shape = (*maps.shape[:-2], int(size[0]), int(size[1]))
    return np.asarray(jax.image.resize(maps, shape, method=method))


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """Everything `attention_maps` computes for a batch of images (numpy arrays)."""

    logits: np.ndarray  # (B, classes)
    attention: np.ndarray  # (L, B, heads, T, T)
    rollout: np.ndarray  # (B, T, T)
    rollout_map: np.ndarray  # (B, gh, gw)
    class_attention: np.ndarray | None  # (L, B, heads, gh, gw); None without a class token
    mean_attention: np.ndarray  # (L, B, heads, gh, gw): patch tokens' average attention per patch
    grid: Grid
    num_prefix_tokens: int


def attention_maps(model: VisionTransformer, params, images) -> AttentionMaps:
    """Runs `model` on `images` (B, H, W, C) in [-1, 1] and returns its attention in every form."""
    cfg = model.config
    images = np.asarray(images, np.float32)
    ph, pw = cfg.pixels_per_token  # a hybrid's tokens are cells of its ResNet's feature map
    grid = (images.shape[1] // ph, images.shape[2] // pw)
    logits, attention = attention_weights(model, params, images)
    rollout = attention_rollout(attention)
    n_prefix = cfg.num_prefix_tokens
    return AttentionMaps(
        logits=logits,
        attention=attention,
        rollout=rollout,
        rollout_map=rollout_map(rollout, n_prefix, grid, from_class_token=cfg.pool == "token"),
        class_attention=(
            class_token_attention(attention, n_prefix, grid) if cfg.has_class_token else None
        ),
        mean_attention=mean_attention(attention, n_prefix, grid),
        grid=grid,
        num_prefix_tokens=n_prefix,
    )


# --- Position embeddings ----------------------------------------------------------------------------


def patch_position_embeddings(params, config: ViTConfig) -> np.ndarray:
    """The position embedding of every patch, (gh*gw, D): learned rows or the fixed sin-cos table."""
    if config.posemb == "sincos2d":
        return np.asarray(posemb_sincos_2d(config.grid_size, config.hidden_size))[0]
    if config.posemb == "none":
        raise ValueError("the model has no position embeddings (config.posemb='none')")
    posemb = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])[0]
    # Class/register rows (when the table has them) are not positions on the grid.
    return posemb[config.num_prefix_tokens :] if config.posemb_covers_prefix else posemb


def posemb_similarity(params, config: ViTConfig) -> np.ndarray:
    """Cosine similarity between the position embeddings of all pairs of patches: (gh, gw, gh, gw).

    `sim[r, c]` is the map of patch (r, c)'s similarity to every patch. A trained ViT learns 2-D
    structure from 1-D embeddings: each map peaks at its own patch and decays with distance.
    """
    posemb = patch_position_embeddings(params, config).astype(np.float64)
    unit = posemb / np.maximum(np.linalg.norm(posemb, axis=-1, keepdims=True), 1e-12)
    gh, gw = config.grid_size
    return (unit @ unit.T).reshape(gh, gw, gh, gw).astype(np.float32)


# --- Drawing ----------------------------------------------------------------------------------------


def to_display_image(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 0..255 or float [-1, 1] → float (H, W, 3) or (H, W) in [0, 1] for imshow."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image of shape {image.shape}: expected (height, width, 1 or 3)")
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = (image.astype(np.float32) + 1.0) / 2.0
    image = np.clip(image, 0.0, 1.0)
    return image[..., 0] if image.shape[-1] == 1 else image


def _imshow_image(ax, image: np.ndarray, *, gray: bool = False) -> None:
    shown = to_display_image(image)
    if gray and shown.ndim == 3:
        shown = shown @ np.array([0.299, 0.587, 0.114], np.float32)  # luminance
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])


def _patch_size(patch_size: int | Sequence[int]) -> Grid:
    return (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)


def plot_patches(
    image: np.ndarray, patch_size: int | Sequence[int], *, numbers: bool = True
) -> Figure:
    """The image cut into patches: grid lines, and each patch's position in the token sequence."""
    ph, pw = _patch_size(patch_size)
    height, width = image.shape[:2]
    gh, gw = height // ph, width // pw
    fig = Figure(figsize=(4, 4 * height / width), layout="constrained")
    ax = fig.add_subplot()
    _imshow_image(ax, image)
    # Pixel centres are at integers, so patch borders sit on the half-pixels.
    for r in range(gh + 1):
        ax.axhline(r * ph - 0.5, color="white", linewidth=1)
    for c in range(gw + 1):
        ax.axvline(c * pw - 0.5, color="white", linewidth=1)
    if numbers and gh * gw <= 256:
        for index in range(gh * gw):
            r, c = divmod(index, gw)
            ax.text(
                c * pw + pw / 2 - 0.5,
                r * ph + ph / 2 - 0.5,
                str(index),
                color="yellow",
                ha="center",
                va="center",
                fontsize=8 if gw <= 8 else 6,
            )
    ax.set_title(f"{gh}x{gw} patches of {ph}x{pw} pixels")
    return fig


def plot_patch_sequence(
    image: np.ndarray, patch_size: int | Sequence[int], *, max_patches: int = 32
) -> Figure:
    """The patches laid out as the token sequence the Transformer reads (row-major order)."""
    ph, pw = _patch_size(patch_size)
    shown = to_display_image(image)
    gh, gw = shown.shape[0] // ph, shown.shape[1] // pw
    count = min(gh * gw, max_patches)
    fig = Figure(figsize=(min(count, 16) * 0.6, 0.6 * math.ceil(count / 16) + 0.4))
    for index in range(count):
        r, c = divmod(index, gw)
        ax = fig.add_subplot(math.ceil(count / 16), min(count, 16), index + 1)
        patch = shown[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
        ax.imshow(patch, cmap="gray" if patch.ndim == 2 else None, vmin=0.0, vmax=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(str(index), fontsize=7)
    more = f" (first {count} of {gh * gw})" if count < gh * gw else ""
    fig.suptitle(f"the sequence of patches{more}", fontsize=9)
    return fig


def _mosaic(tiles: np.ndarray) -> np.ndarray:
    """(R, C, h, w) tiles → one (R*(h+1)-1, C*(w+1)-1) image with NaN gutters between them.

    One imshow of a mosaic is far faster to draw than R*C subplots (196 for a 14x14 grid).
    """
    rows, cols, h, w = tiles.shape
    padded = np.full((rows, cols, h + 1, w + 1), np.nan, np.float32)
    padded[:, :, :h, :w] = tiles
    mosaic = padded.transpose(0, 2, 1, 3).reshape(rows * (h + 1), cols * (w + 1))
    return mosaic[:-1, :-1]


def plot_posemb_similarity(
    similarity_or_params,
    config: ViTConfig | None = None,
    *,
    title: str | None = None,
    vmin: float | None = None,
) -> Figure:
    """Draws `posemb_similarity`: the map at grid cell (r, c) is patch (r, c)'s similarity to all.

    Takes what `posemb_similarity` takes, `(params, config)`, or the (gh, gw, gh, gw) similarity it
    returns. The colour scale runs from the data's minimum (`vmin=None`; sin-cos embeddings, for
    instance, are all similar to each other at large widths, so a fixed -1 would draw them in one
    colour) to 1; `vmin=-1` gives the paper's Fig. 7 scale.
    """
    if config is not None:
        similarity = posemb_similarity(similarity_or_params, config)
    else:
        similarity = np.asarray(similarity_or_params)
        if similarity.ndim != 4:
            raise ValueError(
                f"similarity of shape {similarity.shape}: expected (gh, gw, gh, gw), or pass "
                f"(params, config) as for posemb_similarity"
            )
    if vmin is None:
        low = float(np.nanmin(similarity))
        vmin = low if low < 1.0 else 0.0  # a single patch: only itself
    gh, gw = similarity.shape[:2]
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(_mosaic(np.asarray(similarity)), cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_xticks([(gw + 1) * c + gw / 2 - 0.5 for c in range(gw)], [str(c + 1) for c in range(gw)])
    ax.set_yticks([(gh + 1) * r + gh / 2 - 0.5 for r in range(gh)], [str(r + 1) for r in range(gh)])
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title or "position embedding similarity")
    fig.colorbar(image, ax=ax, label="cosine similarity", shrink=0.8)
    return fig


def _normalized(heatmap: np.ndarray) -> np.ndarray:
    # Each map on its own scale: attention is spread very differently across heads and layers.
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def plot_attention(
    image: np.ndarray,
    maps: np.ndarray,
    *,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    method: str = "bilinear",
    panel_size: float = 1.8,
) -> Figure:
    """Patch-grid maps drawn over an image, each upsampled to it and scaled to its own [0, 1].

    `maps` is (gh, gw) for one map, (K, gh, gw) for a row of K, or (R, K, gh, gw) for R rows, e.g.
    `class_attention[:, b]` for every layer (rows) and head (columns). `image` is one (H, W, C)
    image for all rows, or (R, H, W, C), one per row (e.g. a batch and its `rollout_map[:, None]`).
    `titles` name the columns; each row starts with its image, unblended.
    """
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 2:
        maps = maps[None, None]
    elif maps.ndim == 3:
        maps = maps[None]
    elif maps.ndim != 4:
        raise ValueError(
            f"maps of shape {maps.shape}: expected (gh, gw), (K, gh, gw) or (R, K, gh, gw)"
        )
    rows, cols = maps.shape[:2]
    images = np.asarray(image)
    images = np.broadcast_to(images, (rows, *images.shape)) if images.ndim == 3 else images
    if len(images) != rows:
        raise ValueError(f"{len(images)} images for {rows} rows of maps: expected one or {rows}")
    heatmaps = upsample(maps, images.shape[1:3], method)
    fig = Figure(figsize=(panel_size * (cols + 1), panel_size * rows), layout="constrained")
    axes = fig.subplots(rows, cols + 1, squeeze=False)
    for r in range(rows):
        _imshow_image(axes[r, 0], images[r])
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r])
        for c in range(cols):
            ax = axes[r, c + 1]
            # A gray underlay: colours of the image would read as attention.
            _imshow_image(ax, images[r], gray=True)
            ax.imshow(_normalized(heatmaps[r, c]), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
    axes[0, 0].set_title("image", fontsize=9)
    for c, title in enumerate(titles or []):
        axes[0, c + 1].set_title(title, fontsize=9)
    return fig
