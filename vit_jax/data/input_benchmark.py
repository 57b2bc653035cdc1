"""Measures the input pipeline alone (no model): train and eval images per second.

    python -m vit_jax.data.input_benchmark --dataset digits --image_size 32 --batch_size 128
    python -m vit_jax.data.input_benchmark --dataset jpeg_folder --image_size 224 --batch_size 64

`jpeg_folder` writes a folder of synthetic 224x224 JPEGs (smooth random colour fields, about the
size of ImageNet JPEGs after resizing) into a temporary directory first; any other value is passed
on as `config.dataset` (a TFDS name or an image folder path). Preparing the dataset is not timed.
The train figure uses the default augmentation (Inception crop + flip) unless flags change it.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image


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


def images_per_second(iterator, num_batches: int, warmup: int) -> float:
    for _ in range(warmup):  # Fills prefetch buffers and the shuffle buffer.
        next(iterator)
    start = time.perf_counter()
    num_images = sum(len(next(iterator)["image"]) for _ in range(num_batches))
    return num_images / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data_dir", default=None, help="default: a temporary directory")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--num_images", type=int, default=2000, help="jpeg_folder size")
    parser.add_argument("--randaugment_layers", type=int, default=0)
    parser.add_argument("--mixup_alpha", type=float, default=0.0)
    args = parser.parse_args(argv)

    from vit_jax import input_pipeline  # After argparse, so --help is instant.

    with tempfile.TemporaryDirectory() as tmp:
        config = input_pipeline.default_data_config()
        config.dataset = args.dataset
        config.data_dir = args.data_dir or os.path.join(tmp, "tfds")
        os.makedirs(config.data_dir, exist_ok=True)
        if args.dataset == "jpeg_folder":
            config.dataset = make_jpeg_folder(os.path.join(tmp, "jpegs"), args.num_images)
        config.image_size = args.image_size
        config.batch_size = config.eval_batch_size = args.batch_size
        config.pp.randaugment_layers = args.randaugment_layers
        config.pp.mixup_alpha = args.mixup_alpha
        data = input_pipeline.get_datasets(config, process_index=0, process_count=1)

        train = images_per_second(data.train_iter(), args.num_batches, args.warmup)
        eval_batches = data.num_eval_batches * args.batch_size
        start = time.perf_counter()
        num_eval = sum(len(b["image"]) for b in data.eval_iter())  # First pass: no cache yet.
        eval_speed = num_eval / (time.perf_counter() - start)
        assert num_eval == eval_batches
        print(
            f"{args.dataset}: image_size {args.image_size}, batch {args.batch_size}, "
            f"{os.cpu_count()} CPUs: train {train:,.0f} images/s, eval {eval_speed:,.0f} images/s"
        )


if __name__ == "__main__":
    main()
