"""Measures the input pipeline alone (no model): train and eval images per second.

    python -m vit_jax.tools.input_benchmark --dataset digits --image_size 32 --batch_size 128
    python -m vit_jax.tools.input_benchmark --dataset jpeg_folder --image_size 224 --batch_size 64

`jpeg_folder` writes a folder of synthetic 224x224 JPEGs (smooth random colour fields, about the
size of ImageNet JPEGs after resizing) into a temporary directory first; any other value is passed
on as `config.dataset` (a TFDS name or an image folder path). Preparing the dataset is not timed.
The train figure uses the default augmentation (Inception crop + flip) unless flags change it.

The large-split paths (`--in_memory_max_mib 0` keeps the train split out of memory):

    python -m vit_jax.tools.input_benchmark --dataset jpeg_folder --image_size 224 --batch_size 64 \
        --num_images 4000 --file_format array_record --in_memory_max_mib 0 --reader_stages

`--reader_stages` (ArrayRecord only) times each stage of the by-index path on the same split: the
read alone (undecoded examples of whole steps, in this process and from 1 and 2 Grain workers),
then the full pipeline with `reader='tf'` and with `reader='grain'` (1 and 2 workers), in
`--rounds` interleaved rounds (medians), and projects the per-host ceilings from the per-example
costs: the tf reader runs in one Python thread whatever the cores; Grain's scales with workers.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from vit_jax.tools import cli
from vit_jax.tools.bench import reader_stages


def make_jpeg_folder(root: str, num_images: int, size: int = 224, num_classes: int = 10) -> str:
    """`root/train/class_k/*.jpg` and `root/test/...` of synthetic size x size JPEGs."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        split = "test" if i % 10 == 0 else "train"
        folder = os.path.join(root, split, f"class_{i % num_classes}")
        os.makedirs(folder, exist_ok=True)
        # Upsampled noise: smooth content compresses like a photo, unlike white noise.
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
    return root


# Config fields set from a flag of the same name (eval_batch_size from --batch_size): the data
# config's own checks (`vit_jax.data.validation`) judge them, and their errors name the flag.
_FLAG_OF_FIELD = {
    "dataset": "dataset",
    "image_size": "image_size",
    "batch_size": "batch_size",
    "eval_batch_size": "batch_size",
    "pp.randaugment_layers": "randaugment_layers",
    "pp.mixup_alpha": "mixup_alpha",
    "reader": "reader",
    "grain_workers": "grain_workers",
}
# The benchmark's own flags: (name, smallest allowed value).
_AT_LEAST = (
    ("num_batches", 1),
    ("warmup", 0),
    ("num_images", 2),
    ("rounds", 1),
    ("host_cores", 1),  # None: this machine's
    ("in_memory_max_mib", 0),  # None: the data config's
)


def _parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.input_benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--dataset",
        default="digits",
        help="jpeg_folder (synthetic JPEGs), digits, a TFDS name or an image folder path",
    )
    parser.add_argument("--data_dir", default=None, help="default: a temporary directory")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=100, help="train batches timed")
    parser.add_argument("--warmup", type=int, default=10, help="train batches before timing")
    parser.add_argument("--num_images", type=int, default=2000, help="jpeg_folder size")
    parser.add_argument("--randaugment_layers", type=int, default=0)
    parser.add_argument("--mixup_alpha", type=float, default=0.0)
    parser.add_argument("--file_format", choices=("tfrecord", "array_record"), default=None)
    parser.add_argument(
        "--in_memory_max_mib", type=int, default=None, help="default: the data config's (256)"
    )
    parser.add_argument("--reader", default="tf", help="tf or grain (ArrayRecord splits)")
    parser.add_argument("--grain_workers", type=int, default=2)
    parser.add_argument(
        "--reader_stages", action="store_true", help="time each stage of the by-index path"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--reader_stages: rounds (median)")
    parser.add_argument(
        "--host_cores", type=int, default=None, help="--reader_stages: cores of the projected host"
    )
    return parser


def _data_config(args, pipeline):
    config = pipeline.default_data_config()
    config.dataset = args.dataset
    config.image_size = args.image_size
    config.batch_size = config.eval_batch_size = args.batch_size
    config.pp.randaugment_layers = args.randaugment_layers
    config.pp.mixup_alpha = args.mixup_alpha
    config.reader, config.grain_workers = args.reader, args.grain_workers
    if args.in_memory_max_mib is not None:
        config.in_memory_max_bytes = args.in_memory_max_mib * 2**20
    return config


def _check(parser: argparse.ArgumentParser, args, config) -> None:
    """Every flag, before any image is written or read: a usage error (exit 2) naming it."""
    from vit_jax.data import validation

    try:
        validation.validate_config(config, process_index=0, process_count=1)
    except ValueError as e:
        message = str(e)
        for field, flag in _FLAG_OF_FIELD.items():
            message = message.replace(f"config.{field}=", f"--{flag}=")
        parser.error(message)
    if args.reader_stages and args.file_format != "array_record":
        parser.error("--reader_stages times the by-index path: it needs --file_format array_record")

    if args.dataset == "jpeg_folder":
        return
    import tensorflow_datasets as tfds

    from vit_jax.data import sources

    try:
        if sources.dataset_kind(args.dataset) == "tfds":  # as the pipeline will resolve it
            tfds.builder(args.dataset)  # reads no data
    except FileNotFoundError:
        parser.error(f"--dataset={args.dataset!r} is invalid: no such image folder")
    except tfds.core.registered.DatasetNotFoundError:
        parser.error(
            f"--dataset={args.dataset!r} is invalid: allowed jpeg_folder (synthetic JPEGs), "
            "digits, a TFDS name (e.g. cifar10; prepared in --data_dir) or an image folder path"
        )


def main(argv=None) -> int:
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name, low in _AT_LEAST:
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name}={getattr(args, name)} is invalid: must be >= {low}")
    cli.plain_warnings()
    cli.quiet_logs(args.verbose)  # loads TensorFlow silently: the pipeline is tf.data

    from vit_jax.data import pipeline  # After argparse, so --help is instant.

    config = _data_config(args, pipeline)
    _check(parser, args, config)
    return cli.run_guarded(lambda: _run(args, config, pipeline), args.verbose)


def _run(args, config, pipeline) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config.data_dir = args.data_dir or os.path.join(tmp, "tfds")
        os.makedirs(config.data_dir, exist_ok=True)
        if args.dataset == "jpeg_folder":
            config.dataset = make_jpeg_folder(os.path.join(tmp, "jpegs"), args.num_images)
        if args.file_format:
            reader_stages.prepare(config, args.file_format)
        data = pipeline.get_datasets(config, process_index=0, process_count=1)
        if args.reader_stages:
            print(reader_stages.report(data, config, args))
            return 0

        train = reader_stages.images_per_second(data.train_iter(), args.num_batches, args.warmup)
        eval_batches = data.num_eval_batches * args.batch_size
        start = time.perf_counter()
        num_eval = sum(len(b["image"]) for b in data.eval_iter())  # First pass: no cache yet.
        eval_speed = num_eval / (time.perf_counter() - start)
        assert num_eval == eval_batches
        print(
            f"{args.dataset}: image_size {args.image_size}, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs: train {train:,.0f} images/s, eval {eval_speed:,.0f} images/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
