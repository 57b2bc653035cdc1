"""Classify images with any ViT checkpoint and print the top-k classes.

    python -m vit_jax.tools.predict --checkpoint PATH [--labels imagenet|FILE] [--top_k 5] IMAGE...
        [--variant V] [--set FIELD=VALUE ...]   # what the weights do not say, as for vit_jax.tools.convert
        [--weights ema|raw]   # a training run's EMA or raw weights (default: EMA when it has one)

PATH is an exported model (`model.onnx`, `model.tflite`, a SavedModel folder, `model.stablehlo`:
run in its own runtime, which must be installed: onnxruntime, ai-edge-litert, tensorflow, jax), or
anything `vit_jax.load_pretrained` reads: a published vit_jax or big_vision `.npz`, a timm
`.safetensors`, a Hugging Face folder, or one of this project's Orbax checkpoints (a run's
`checkpoints/` folder, e.g. `workdirs/digits/checkpoints`, or one step in it). Each image is read with
PIL (grayscale ↔ RGB as the checkpoint needs), resized whole to the checkpoint's own resolution
(bilinear, antialiased, as the input pipeline does for evaluation; `--set image_size=...` picks
another, resampling the position embeddings) and normalized with the checkpoint's own input
convention (`vit_jax.interop.input_convention`): what training recorded, our exports' metadata, a timm
config's or HF preprocessor's mean/std; (x - 127.5) / 127.5, the published checkpoints' convention,
otherwise (with a warning when that is a guess). A model trained on white-on-black digits gets a
dark-on-light image inverted first (said on stderr).

Class names: `--labels imagenet` uses the ImageNet-1k names that tensorflow_datasets ships; `--labels
FILE` one name per line. Without `--labels`: a Hugging Face folder's own `id2label`, else the ImageNet
names for a 1000-class head, else the class index (for the digits checkpoint the index is the digit).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.interop.input_convention import DEFAULT, Preprocessing, match_channels, read_image
from vit_jax.model.vit import VisionTransformer
from vit_jax.tools import cli

# tensorflow_datasets keeps the 1000 ImageNet-1k class names, in the standard (sorted WordNet id)
# order, as a Python list in this module. We read it as text so that asking for names does not
# import tensorflow.
_TFDS_IMAGENET_LABELS = ("datasets", "siscore", "labels.py")
_TFDS_IMAGENET_LABELS_LIST = "IMAGENET_LABELS_LIST"


# --- Images -----------------------------------------------------------------------------------------


def preprocess(
    pixels: np.ndarray,
    image_size: Sequence[int],
    channels: int = 3,
    preprocessing: Preprocessing = DEFAULT,
) -> np.ndarray:
    """uint8 (H, W, C) → float32 (*image_size, channels) model input, resized as evaluation does;
    normalized by `preprocessing` (default: [-1, 1])."""
    return preprocessing.apply(pixels, image_size, channels)


def load_images(
    paths: Sequence[str],
    image_size: Sequence[int],
    channels: int = 3,
    preprocessing: Preprocessing = DEFAULT,
) -> np.ndarray:
    """The model inputs (B, H, W, C) for image files; every file is read before any is resized."""
    pixels = [read_image(path) for path in paths]
    return np.stack([preprocess(p, image_size, channels, preprocessing) for p in pixels])


# --- Class names ------------------------------------------------------------------------------------


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in label order, read from the installed tensorflow_datasets."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ImageNet class names come from tensorflow_datasets, which is not installed; pass "
            "--labels FILE with one name per line instead"
        )
    source = pathlib.Path(spec.submodule_search_locations[0], *_TFDS_IMAGENET_LABELS)
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(target, "id", None) == _TFDS_IMAGENET_LABELS_LIST for target in node.targets
        ):
            names = ast.literal_eval(node.value)
            if len(names) == 1000:
                return list(names)
    raise ValueError(f"no list of 1000 ImageNet class names in {source}")


def read_label_file(path: str | pathlib.Path) -> list[str]:
    """One class name per line; blank trailing lines are ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {str(path)!r} does not exist")
    return path.read_text().rstrip("\r\n").splitlines()


def _hf_labels(checkpoint: str) -> list[str] | None:
    """A Hugging Face folder's `id2label`, unless it is the placeholder LABEL_0, LABEL_1, ..."""
    config = pathlib.Path(checkpoint) / "config.json"
    if not config.is_file():
        return None
    try:
        id2label = json.loads(config.read_text()).get("id2label") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    names = [id2label.get(str(i)) for i in range(len(id2label))]
    if None in names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


def label_names(labels: str | None, num_classes: int, checkpoint: str = "") -> list[str]:
    """Names for the classes of a checkpoint's head; see the module docstring for the defaults."""
    if labels == "imagenet":
        names = imagenet_labels()
    elif labels:
        names = read_label_file(labels)
    else:
        names = _hf_labels(checkpoint)
        if names is None and num_classes == 1000:
            try:
                names = imagenet_labels()
            except (OSError, ValueError):
                names = None  # Indices are still an answer.
        if names is None:
            names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        source = "ImageNet-1k" if labels == "imagenet" else repr(labels or checkpoint)
        raise ValueError(
            f"{source} names {len(names)} classes but the checkpoint's head has {num_classes}"
        )
    return names


_WEIGHTS_SHOWN = {"ema": "the EMA weights", "raw": "the raw (not averaged) weights"}


# --- Prediction -------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model: VisionTransformer, params, images):
    return jax.nn.softmax(model.apply({"params": params}, images), axis=-1)


def predict(
    model: VisionTransformer, params, images: np.ndarray, top_k: int = 5, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, class indices), each (B, k), best first, for model inputs in [-1, 1]."""
    cfg = model.config
    if not cfg.num_classes or cfg.pool == "none":
        raise ValueError(
            f"the checkpoint has no classification head (num_classes={cfg.num_classes}, "
            f"pool={cfg.pool!r}): nothing to predict"
        )
    top_k = min(top_k, cfg.num_classes)
    probs = np.concatenate(
        [
            np.asarray(_probabilities(model, params, jnp.asarray(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
    )
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    return np.take_along_axis(probs, order, axis=-1), order


def predict_deployed(
    runner, pixels: Sequence[np.ndarray], paths: Sequence[str], top_k: int = 5, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, class indices) of an exported file (`vit_jax.interop.deploy.load`) for uint8
    pixels: normalized here as the file's input convention says, or fed as pixels to a file that
    has the preprocessing inside (`--with_preprocessing`)."""
    meta = runner.meta
    shape, channels = meta["input"]["shape"], meta["input"]["channels"]
    if meta["input"]["with_preprocessing"]:
        images = [match_channels(np.asarray(p, np.uint8), channels) for p in pixels]
        size = tuple(shape[1:3])
        for path, image in zip(paths, images):
            if -1 not in size and image.shape[:2] != size:
                raise ValueError(
                    f"{path} is {image.shape[0]}x{image.shape[1]}; this file takes "
                    f"{size[0]}x{size[1]} images (exported with input_size={list(size)})"
                )
        same = len({image.shape for image in images}) == 1
        groups = [np.stack(images)] if same else [image[None] for image in images]
    else:
        pre = Preprocessing.from_dict(meta["preprocessing"])
        size = meta["input"]["image_size"]
        groups = [np.stack([preprocess(p, size, channels, pre) for p in pixels])]
    logits = np.concatenate(
        [runner(g[i : i + batch_size]) for g in groups for i in range(0, len(g), batch_size)]
    ).astype(np.float64)
    if logits.ndim != 2 or not meta["config"]["num_classes"]:
        raise ValueError("the exported model has no classification head: nothing to predict")
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, : min(top_k, probs.shape[-1])]
    return np.take_along_axis(probs, order, axis=-1), order


def format_predictions(
    path: str, probs: np.ndarray, indices: np.ndarray, names: Sequence[str]
) -> str:
    """One block per image: its path, then `rank. probability  name [index]` lines."""
    lines = [path]
    for rank, (prob, index) in enumerate(zip(probs, indices), start=1):
        name = names[index]
        suffix = "" if name == str(index) else f"  [{index}]"
        lines.append(f"  {rank}. {prob:7.2%}  {name}{suffix}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.predict",
        description="Print the top-k classes a ViT checkpoint predicts for each image.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a .npz, .safetensors, Hugging Face folder, Orbax checkpoint (dir or step dir), or an "
        "exported .onnx / .tflite / .stablehlo file or SavedModel folder",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="a public checkpoint's name for the model --checkpoint names, e.g. --checkpoint "
        "ViT-B/16 --pretrained augreg-i21k-ft-i1k (see vit_jax.list_pretrained())",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="what the weights do not say, e.g. ViT-B/16 for timm's heads",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ViTConfig override for loading, e.g. --set num_heads=4 (repeatable)",
    )
    parser.add_argument(
        "--labels", default=None, help="'imagenet', or a text file with one class name per line"
    )
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="a training run's weights: its EMA (kept with config.ema_decay > 0) or the raw ones; default: the EMA when the checkpoint has one, else raw",
    )
    parser.add_argument("--top_k", type=int, default=5, help="how many classes to print per image")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files PIL can read")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k={args.top_k} must be at least 1")
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be at least 1")
    overrides = cli.parse_overrides(parser, args.set)
    cli.plain_warnings()
    cli.quiet_logs(args.verbose, tensorflow=False)

    def run() -> int:
        # Orbax, safetensors & co, and the runtimes: imported only when it runs.
        from vit_jax.interop import deploy, load

        # Read every image first: a typo in the last file should not cost a checkpoint load.
        pixels = [read_image(path) for path in args.images]
        if deploy.detect(args.checkpoint) is not None:  # an exported file: its own runtime
            if args.weights == "ema":
                raise ValueError(
                    f"--weights ema: {args.checkpoint} is an exported model, which holds one set "
                    f"of weights (the ones it was converted from); allowed for it: no --weights"
                )
            runner = deploy.load(args.checkpoint)
            probs, indices = predict_deployed(
                runner, pixels, args.images, args.top_k, args.batch_size
            )
            labels = runner.meta.get("labels") if args.labels is None else None
            num_classes = runner.meta["config"]["num_classes"]
            names = labels or label_names(args.labels, num_classes, args.checkpoint)
            for path, p, i in zip(args.images, probs, indices):
                print(format_predictions(path, p, i, names))
            return 0
        loaded = load.load_checkpoint(
            args.checkpoint,
            variant=args.variant,
            pretrained=args.pretrained,
            weights=args.weights,
            **overrides,
        )
        if loaded.weights:  # a training run's: say which of its weights answer
            print(f"{args.checkpoint}: {_WEIGHTS_SHOWN[loaded.weights]}", file=sys.stderr)
        model, params, pre = VisionTransformer(loaded.config), loaded.params, loaded.preprocessing
        cfg = model.config
        names = label_names(args.labels, cfg.num_classes, args.checkpoint)
        for path, p in zip(args.images, pixels):
            if pre.orient(p)[1]:
                print(f"{path}: inverted (the model expects {pre.polarity})", file=sys.stderr)
        images = np.stack([preprocess(p, cfg.image_size, cfg.num_channels, pre) for p in pixels])
        probs, indices = predict(model, params, images, args.top_k, args.batch_size)
        for path, p, i in zip(args.images, probs, indices):
            print(format_predictions(path, p, i, names))
        return 0

    return cli.run_guarded(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
