r"""Few-shot linear evaluation of any checkpoint we load (`vit_jax.train.fewshot`).

  python -m vit_jax.tools.fewshot --checkpoint workdirs/digits --dataset digits --shots 1,5,10
  python -m vit_jax.tools.fewshot --checkpoint ViT-B_16.npz --dataset cifar10 --shots 1,5,10,25 \
      --data_dir ~/tensorflow_datasets

Reads both splits whole and un-augmented through the input pipeline (the eval path: resized to the
checkpoint's image size, every example once), puts them in the checkpoint's input convention
(mean/std, channel order; polarity is left as the dataset has it), extracts the frozen pre-logits
features, and prints, per shot count, the test accuracy of closed-form ridge regression on k
examples per class (mean and per seed) with the regularizer each seed used and how it was chosen.
`--json_out` writes the same as JSON. A checkpoint may be a workdir, an .npz, timm or HF weights,
or a published name with `--pretrained`. `--random_init SEED` evaluates the checkpoint's
architecture with freshly initialized weights instead (the baseline that says what training added).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from vit_jax.tools import cli


def _ints(text: str, name: str, parser) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        parser.error(f"--{name}={text!r}: expected comma-separated integers, e.g. 1,5,10")
    if not values or (name == "shots" and min(values) < 1) or min(values) < 0:
        parser.error(
            f"--{name}={text!r}: expected {'positive' if name == 'shots' else 'non-negative'} integers"
        )
    return values


def read_split(dataset: str, split: str, model_config, data_dir: str | None, batch_size: int):
    """Every example of `split` once, as ([-1, 1] images, labels), through the eval pipeline, at
    the model's image size and channel count."""
    from configs import common
    from vit_jax import data as data_lib

    config = common.get_config()
    config.dataset, config.eval_split = dataset, split
    config.image_size = int(model_config.image_size[0])
    config.pp.num_channels = model_config.num_channels
    config.eval_batch_size = batch_size
    if data_dir:
        config.data_dir = data_dir
    data = data_lib.get_datasets(config)
    images, labels = [], []
    for batch in data.eval_iter():
        real = np.asarray(batch["mask"]).astype(bool) if "mask" in batch else slice(None)
        images.append(np.asarray(batch["image"])[real])
        labels.append(np.asarray(batch["label"])[real].argmax(-1))
    return np.concatenate(images), np.concatenate(labels), data.num_classes


def to_convention(images: np.ndarray, preprocessing: Any) -> np.ndarray:
    """Pipeline images in [-1, 1] → the checkpoint's normalization and channel order."""
    pixels = (images.astype(np.float32) + 1.0) * 127.5
    channels = images.shape[-1]
    if preprocessing.channel_order == "BGR" and channels == 3:
        pixels = pixels[..., ::-1]
    mean, std = preprocessing.mean_std(channels, 255.0)
    return ((pixels - mean) / std).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.fewshot",
        description="Few-shot linear (ridge regression) accuracy of a checkpoint's frozen features.",
    )
    parser.add_argument("--checkpoint", required=True, help="workdir, file, folder or model name")
    parser.add_argument("--pretrained", help="a published checkpoint's name (see tools.pretrained)")
    parser.add_argument("--dataset", default="digits", help="a TFDS name or an image folder")
    parser.add_argument("--data_dir", help="TFDS data dir")
    parser.add_argument("--train_split", default="train", help="where the shots are drawn from")
    parser.add_argument("--test_split", default="test", help="what the accuracy is measured on")
    parser.add_argument("--shots", default="1,5,10", help="examples per class, e.g. 1,5,10,25")
    parser.add_argument("--seeds", default="0,1,2", help="one draw of the shots per seed")
    parser.add_argument("--batch_size", type=int, default=256, help="feature extraction batch")
    parser.add_argument("--variant", help="what the weights do not say, e.g. ViT-B/16")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="a training run's weights: its EMA (kept with config.ema_decay > 0) or the raw ones; default: the EMA when the checkpoint has one, else raw",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a ViTConfig override"
    )
    parser.add_argument(
        "--random_init",
        type=int,
        metavar="SEED",
        help="use the checkpoint's architecture with random weights from this seed (a baseline)",
    )
    parser.add_argument("--json_out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    shots, seeds = _ints(args.shots, "shots", parser), _ints(args.seeds, "seeds", parser)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size}: must be at least 1")
    overrides = cli.parse_overrides(parser, args.set)
    cli.quiet_logs(args.verbose)

    def run() -> int:
        from vit_jax.interop import load
        from vit_jax.model.vit import VisionTransformer
        from vit_jax.train import fewshot

        loaded = load.load_checkpoint(
            args.checkpoint,
            variant=args.variant,
            pretrained=args.pretrained,
            weights=args.weights,
            **overrides,
        )
        model = VisionTransformer(loaded.config)
        cfg = loaded.config
        params = loaded.params
        if args.random_init is not None:
            import jax

            from vit_jax.model.vit import init_params

            params = init_params(model, jax.random.key(args.random_init))
        train = read_split(args.dataset, args.train_split, cfg, args.data_dir, args.batch_size)
        test = read_split(args.dataset, args.test_split, cfg, args.data_dir, args.batch_size)
        num_classes = train[2]
        smallest = fewshot.min_class_size(train[1], num_classes)
        if max(shots) > smallest:  # before any feature is computed
            raise ValueError(
                f"--shots {max(shots)} is larger than the smallest class of {args.dataset!r} "
                f"{args.train_split} ({smallest} examples); allowed: shots up to {smallest}"
            )
        features = [
            fewshot.extract_features(
                model, params, to_convention(x, loaded.preprocessing), args.batch_size
            )
            for x in (train[0], test[0])
        ]
        results = fewshot.evaluate(
            features[0], train[1], features[1], test[1],
            shots=shots, seeds=seeds, num_classes=num_classes,
        )  # fmt: skip
        weights = f" ({loaded.weights} weights)" if loaded.weights else ""
        if args.random_init is not None:
            weights = f" (its architecture, random weights of seed {args.random_init})"
        print(
            f"{args.checkpoint}{weights}: "
            f"{features[0].shape[1]}-d features, {args.dataset} "
            f"({len(train[1])} {args.train_split} / {len(test[1])} {args.test_split} examples, "
            f"{num_classes} classes)"
        )
        for r in results:
            per_seed = ", ".join(f"{a:.1%}" for a in r.accuracies)
            l2 = ", ".join(f"{v:g}" for v in r.l2)
            print(
                f"  {r.shots:>3}-shot: {r.accuracy:.2%} (seeds {seeds}: {per_seed}; "
                f"ridge λ {l2}, {r.l2_chosen_by})"
            )
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
        return 0

    return cli.run_guarded(run, args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
