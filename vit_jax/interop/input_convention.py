"""The input convention a model was trained with: it travels with the model, in its checkpoint.

    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))   # DeiT / ImageNet
    pre = Preprocessing()                                     # vit_jax, big_vision: [-1, 1]
    x = pre.apply(uint8_pixels, image_size=(224, 224), channels=3)   # float32 model input

`mean`/`std` are per channel, of pixels scaled to [0, 1] (the timm / Hugging Face convention), so the
published vit_jax convention (x - 127.5) / 127.5 is mean = std = 0.5. `polarity` says what the model
expects of images that have a background: 'white_on_black' (the digits model: bright strokes on a
dark ground) inverts a dark-on-light image (judged by its border) before anything else; 'any' leaves
every image as it is. Images are resized whole (no crop) with `resize`, as evaluation does.
`read_image(path)` reads an image file as uint8 pixels (grayscale or RGB, as the file is).
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLARITIES = ("any", "white_on_black")
CHANNEL_ORDERS = ("RGB", "BGR")
RESIZE_METHODS = ("bilinear", "bicubic", "nearest")
# Datasets whose images have a fixed polarity the model learns (name → polarity).
DATASET_POLARITY = {"digits": "white_on_black", "mnist": "white_on_black"}


def _floats(value: Any, name: str) -> tuple[float, ...]:
    values = (value,) if isinstance(value, (int, float)) else tuple(value)
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{name}={value!r}: expected a number or one per channel")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 pixels become this model's inputs. Defaults: vit_jax's [-1, 1]."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    polarity: str = "any"
    resize: str = "bilinear"

    def __post_init__(self):
        object.__setattr__(self, "mean", _floats(self.mean, "mean"))
        object.__setattr__(self, "std", _floats(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std={self.std}: expected positive values")
        for name, allowed in (
            ("channel_order", CHANNEL_ORDERS),
            ("polarity", POLARITIES),
            ("resize", RESIZE_METHODS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(
                f"unknown preprocessing field(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return cls(**values)

    def describe(self) -> str:
        scale = (
            "(x - 127.5) / 127.5"
            if set(self.mean) == {0.5} and set(self.std) == {0.5}
            else f"(x / 255 - mean {list(self.mean)}) / std {list(self.std)}"
        )
        extra = "" if self.polarity == "any" else f", {self.polarity.replace('_', ' ')}"
        return f"{scale}, {self.channel_order}{extra}"

    def mean_std(self, channels: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std), one float32 per channel of a `channels`-channel model, times `scale` (255:
        in pixel units). One value serves every channel; RGB statistics serve a gray model as
        their mean."""
        per_channel = self._per_channel
        return scale * per_channel(self.mean, channels), scale * per_channel(self.std, channels)

    def _per_channel(self, values: tuple[float, ...], channels: int) -> np.ndarray:
        if len(values) == channels:
            return np.asarray(values, np.float32)
        if len(values) == 1:
            return np.full(channels, values[0], np.float32)
        return np.full(channels, np.mean(values), np.float32)  # RGB stats for a gray model

    def orient(self, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        """Pixels in the polarity the model expects, and whether they were inverted."""
        if self.polarity != "white_on_black":
            return pixels, False
        border = np.concatenate(
            [pixels[0].ravel(), pixels[-1].ravel(), pixels[:, 0].ravel(), pixels[:, -1].ravel()]
        )
        if border.astype(np.float32).mean() > 127.5:  # a light background: dark-on-light
            return 255 - pixels, True
        return pixels, False

    def apply(self, pixels: np.ndarray, image_size: Sequence[int], channels: int = 3) -> np.ndarray:
        """uint8 (H, W, C) → float32 (*image_size, channels): orient, channels, resize, normalize."""
        import jax
        import jax.numpy as jnp

        pixels, _ = self.orient(np.asarray(pixels, np.uint8))
        pixels = match_channels(pixels, channels)
        if self.channel_order == "BGR" and channels == 3:
            pixels = pixels[..., ::-1]
        shape = (int(image_size[0]), int(image_size[1]), channels)
        method = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}[self.resize]
        resized = jax.image.resize(
            jnp.asarray(pixels, jnp.float32), shape, method=method, antialias=method != "nearest"
        )
        # In pixel units, so that mean = std = 0.5 is exactly (x - 127.5) / 127.5.
        mean, std = self.mean_std(channels, 255.0)
        return np.asarray((jnp.clip(resized, 0.0, 255.0) - mean) / std, np.float32)


# --- Image files → pixels ---------------------------------------------------------------------

_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
# 16-bit grayscale (PIL's modes of a 16-bit PNG): PIL's convert("L") clips these to 255, where
# training's decoder (tf.io.decode_image) scales them, keeping the high byte (v >> 8), as PIL itself
# does for 16-bit RGB. read_image scales them the same way, so that predictions match training.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


def read_image(path: str | pathlib.Path) -> np.ndarray:
    """The pixels of an image file as uint8 (H, W, 1) for grayscale files, else (H, W, 3) RGB,
    decoded as the input pipeline decodes them (16-bit images keep their high byte)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist (or is not a file)")
    try:
        # PIL warns of a "decompression bomb" above Image.MAX_IMAGE_PIXELS: the file was asked
        # for by name, so it is read (and resized); twice that is refused below, naming the file.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"{str(path)!r} is too large to read: {e} Resize it first (or raise "
            f"PIL.Image.MAX_IMAGE_PIXELS in Python)"
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not an image file that PIL can read ({e})") from e
    try:
        with image:
            if image.mode in _SIXTEEN_BIT_MODES:
                wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
                return (wide >> 8).astype(np.uint8)[..., None]
            image = image.convert("L" if image.mode in _GRAYSCALE_MODES else "RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not an image file that PIL can read ({e})") from e
    pixels = np.asarray(image, np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale → RGB by repetition, RGB → grayscale by ITU-R 601 luma (what PIL's 'L' does)."""
    if pixels.shape[-1] == channels:
        return pixels
    if channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.round(luma)[..., None].astype(np.uint8)


DEFAULT = Preprocessing()
IMAGENET = Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def for_training(dataset: str, channels: int) -> Preprocessing:
    """What `vit_jax.data.preprocess.normalize` does for this dataset: [-1, 1], its polarity."""
    name = str(dataset).split(":")[0].split("/")[0]
    return Preprocessing(
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        polarity=DATASET_POLARITY.get(name, "any"),
    )
