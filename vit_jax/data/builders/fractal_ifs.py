"""Fractal images from iterated function systems (IFS), FractalDB's recipe, in numpy only.

Kataoka et al., "Pre-training without Natural Images" (ACCV 2020), as described there:

* A *category* is an IFS of N ~ U{2..8} affine maps w_k(x) = A_k x + b_k, the six parameters of
  each (a, b, c, d | e, f) drawn from U(-1, 1); map k is picked with probability proportional to
  |det A_k|. A random IFS is kept only if its attractor covers enough of the picture: its
  *filling rate* (share of pixels hit, rendered at a fixed `FILL_SIZE` with `FILL_POINTS` points:
  our choice, 64 px and 32,768 points, so the categories do not depend on the output resolution)
  is at least `FILL_THRESHOLD` (0.2 as in the paper); else it is redrawn (~22 % are kept).
* An *instance* of a category: one parameter of one map multiplied by a weight in [0.8, 1.2] (the
  paper's parameter weighting), then rendered with random colours (one per map, pixels take the
  mean colour of the points that hit them), a random flip (none, horizontal, vertical, both) and a
  random binary patch stamped at every point (the paper's 3 x 3 patch at 224 px, scaled with the
  resolution; a single pixel below ~75 px).

Everything is drawn from `numpy.random.Generator(PCG64)` streams keyed on (seed, what, index), so a
category or an instance depends only on its own key: the same bytes however the work is split over
processes. The chaos game (x <- w_k(x), k random) moves up to `MAX_CHAINS` points at once, one
numpy step for all of them: an image costs 50-120 vectorized steps, not one Python step per point.
"""

import io

import numpy as np
from PIL import Image

MIN_MAPS, MAX_MAPS = 2, 8
FILL_THRESHOLD = 0.2
FILL_SIZE = 64  # Side of the picture the filling rate is measured on, whatever the resolution.
FILL_POINTS = 32_768
POINTS_PER_PIXEL = 4  # Chaos-game points per output pixel of an instance.
WEIGHT_RANGE = (0.8, 1.2)
# Points iterated in parallel: num_points / 32, within these bounds.
MIN_CHAINS, MAX_CHAINS = 128, 2048
BURN_IN = 16  # Steps dropped at the start of each chain (it is still approaching the attractor).
_MARGIN = 0.04  # Blank border, as a fraction of the side.
# Stream tags, so categories, instances and splits draw independent randomness from one seed.
_CATEGORY, _INSTANCE = 1, 2


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def map_probabilities(maps: np.ndarray) -> np.ndarray:
    """p_k proportional to |det A_k| (uniform if every map is singular)."""
    det = np.abs(maps[:, 0] * maps[:, 3] - maps[:, 1] * maps[:, 2])
    total = det.sum()
    return det / total if total > 0 else np.full(len(maps), 1.0 / len(maps))


def chaos_game(maps: np.ndarray, num_points: int, rng: np.random.Generator):
    """`num_points` points of the IFS's attractor, (x, y, map index) each, or None if the orbit
    leaves the floats (a map that expands). float32: ample for pixel positions, half the traffic."""
    cumulative = np.cumsum(map_probabilities(maps))
    chains = int(np.clip(num_points // 32, MIN_CHAINS, MAX_CHAINS))
    steps = BURN_IN + -(-num_points // chains)
    draws = rng.random((steps, chains), dtype=np.float32) * np.float32(cumulative[-1])
    picks = np.zeros((steps, chains), np.uint8)
    for threshold in cumulative[:-1].astype(np.float32):
        picks += draws >= threshold  # = searchsorted(cumulative, draws, 'right'), N <= 8
    table = maps.astype(np.float32)
    x = rng.uniform(-1, 1, chains).astype(np.float32)
    y = rng.uniform(-1, 1, chains).astype(np.float32)
    xs = np.empty((steps, chains), np.float32)
    ys = np.empty((steps, chains), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            m = table[picks[t]]  # (chains, 6): each point's map
            x, y = m[:, 0] * x + m[:, 1] * y + m[:, 4], m[:, 2] * x + m[:, 3] * y + m[:, 5]
            xs[t], ys[t] = x, y
    xs, ys, picks = (v[BURN_IN:].ravel()[:num_points] for v in (xs, ys, picks))
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    return xs, ys, picks


def pixel_indices(xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray | None:
    """Points -> flat pixel indices of a `size` x `size` picture: the points' bounding box, aspect
    kept, centred with a small margin (None for a degenerate, single-point attractor)."""
    lo_x, hi_x, lo_y, hi_y = xs.min(), xs.max(), ys.min(), ys.max()
    extent = max(hi_x - lo_x, hi_y - lo_y)
    if not extent > 1e-12:
        return None
    scale = size * (1 - 2 * _MARGIN) / extent
    col = (xs - (lo_x + hi_x) / 2) * scale + size / 2
    row = (ys - (lo_y + hi_y) / 2) * scale + size / 2
    col = np.clip(col.astype(np.int64), 0, size - 1)
    row = np.clip(row.astype(np.int64), 0, size - 1)
    return row * size + col


def filling_rate(maps: np.ndarray, rng: np.random.Generator) -> float:
    """Share of the `FILL_SIZE`^2 pixels the attractor hits (0 for one that diverges)."""
    points = chaos_game(maps, FILL_POINTS, rng)
    if points is None:
        return 0.0
    index = pixel_indices(points[0], points[1], FILL_SIZE)
    if index is None:
        return 0.0
    hit = np.zeros(FILL_SIZE * FILL_SIZE, bool)
    hit[index] = True
    return float(hit.mean())


def candidate(seed: int, index: int) -> tuple[np.ndarray, float]:
    """Candidate category `index` of `seed`: its maps (N x 6) and filling rate."""
    rng = _rng(seed, _CATEGORY, index)
    maps = rng.uniform(-1.0, 1.0, (int(rng.integers(MIN_MAPS, MAX_MAPS + 1)), 6))
    return maps, filling_rate(maps, rng)


def find_categories(seed: int, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
    """The accepted candidates among indices start..stop-1: (index, maps), in index order."""
    found = []
    for index in range(start, stop):
        maps, rate = candidate(seed, index)
        if rate >= FILL_THRESHOLD:
            found.append((index, maps))
    return found


def patch_size(resolution: int) -> int:
    """Side of the patch stamped at each point: 3 at 224 px (the paper's), 1 below ~75 px."""
    return max(1, round(3 * resolution / 224))


def render_instance(maps: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One instance of the category with these maps: (resolution, resolution, 3) uint8."""
    weighted = maps.copy()
    weighted[rng.integers(len(maps)), rng.integers(6)] *= rng.uniform(*WEIGHT_RANGE)
    colours = _random_colours(rng, len(maps))
    flip = int(rng.integers(4))
    size = patch_size(resolution)
    patch = rng.random((size, size)) < 0.5
    patch.flat[rng.integers(size * size)] = True  # at least one pixel on
    # The category's own maps if the weighting made the orbit diverge (rare).
    for system in (weighted, maps):
        points = chaos_game(system, POINTS_PER_PIXEL * resolution * resolution, rng)
        index = None if points is None else pixel_indices(points[0], points[1], resolution)
        if index is not None:
            return _draw(index, points[2], resolution, colours, flip, patch)
    return np.zeros((resolution, resolution, 3), np.uint8)


def _random_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` bright, saturated RGB colours in [0, 1] (random hue)."""
    hue = rng.random(count)
    saturation = rng.uniform(0.5, 1.0, count)
    value = rng.uniform(0.7, 1.0, count)
    # HSV -> RGB, the standard piecewise formula.
    k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6) % 6
    rgb = value[:, None] * (1 - saturation[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return rgb


def _draw(index, picks, resolution, colours, flip, patch) -> np.ndarray:
    pixels = resolution * resolution
    counts = np.bincount(index, minlength=pixels).astype(np.float64)
    rgb = np.stack(
        [np.bincount(index, weights=colours[picks, ch], minlength=pixels) for ch in range(3)], -1
    )
    hit = counts > 0
    rgb[hit] /= counts[hit, None]
    image = rgb.reshape(resolution, resolution, 3)
    if patch.size > 1:  # Stamp the patch at every hit pixel: max over its shifted copies.
        stamped = np.zeros_like(image)
        for dy, dx in zip(*np.nonzero(patch)):
            shifted = np.zeros_like(image)
            shifted[dy:, dx:] = image[: resolution - dy, : resolution - dx]
            stamped = np.maximum(stamped, shifted)
        image = stamped
    if flip & 1:
        image = image[:, ::-1]
    if flip & 2:
        image = image[::-1]
    return np.round(image * 255).astype(np.uint8)


def instance(
    maps: np.ndarray, seed: int, label: int, split: int, number: int, resolution: int
) -> np.ndarray:
    """Instance `number` of category `label` in split `split` (0 train, 1 test), as uint8 pixels."""
    return render_instance(maps, resolution, _rng(seed, _INSTANCE, label, split, number))


def png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of `image` (deterministic: PIL's default zlib level)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()
