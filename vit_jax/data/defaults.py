"""The default of every data field, each with its meaning: the one home of both.

`input_pipeline.default_data_config()` and the base config `configs/common.py` both start from
these, so they cannot disagree. Free of TensorFlow, so config files import it cheaply.
"""

DATA_DEFAULTS = dict(
    # TFDS name ('cifar10', 'imagenet2012', 'digits', ...) or an image folder
    # `<root>/<split>/<class_name>/*.{jpg,jpeg,png}`.
    dataset="digits",
    data_dir=None,  # TFDS data dir; None = TFDS's default (~/tensorflow_datasets).
    train_split="train",  # TFDS split spec to train on, e.g. 'train' or 'train[:90%]'.
    eval_split="test",  # split evaluated every eval_every_steps and at the end.
    image_size=224,  # side of the square images the pipeline makes and the model is built for.
    batch_size=512,  # global training batch (all processes and devices together).
    eval_batch_size=512,  # global eval batch; the last partial batch is padded and masked.
    seed=0,  # seeds data order, augmentation and the model's init/dropout: same seed, same run.
    shuffle_buffer_size=50_000,  # tf.data shuffle buffer per process; streamed splits only.
    # Train splits of up to this many (stored) bytes are read into memory once: random access, one
    # global order. Larger ones are read by index (ArrayRecord) or streamed per process (TFRecord).
    in_memory_max_bytes=256 * 2**20,
    # How a larger ArrayRecord train split is read by index (same order, same batches either way):
    # 'tf' inside tf.numpy_function (one Python thread: ~17k examples/s at most per process) or
    # 'grain' in grain_workers processes (vit_jax.data.grain_reader; a ceiling that scales with
    # cores). Only such splits use it (in-memory and streamed ones ignore it). 'tf' until measured
    # otherwise: Grain's workers each import Grain at start.
    reader="tf",
    grain_workers=2,  # reader='grain': worker processes reading (0 = in this process, no workers).
    skip_corrupt_images=False,  # image folders: skip (and count) files that do not decode.
)

PREPROCESSING_DEFAULTS = dict(
    crop_area_range=(0.05, 1.0),  # Inception crop: kept fraction of the area; None = whole image.
    crop_aspect_range=(3 / 4, 4 / 3),  # aspect ratios the Inception crop may take.
    flip=True,  # random horizontal flips when training.
    translate_pixels=0,  # random shifts of up to this many output pixels, black fill.
    rotate_degrees=0.0,  # random rotations by up to ± this angle about the centre; 0 = off.
    scale_range=None,  # random zoom about the centre by a factor in (min, max); None = off.
    label_smoothing=0.0,  # ε: train targets (1-ε)·onehot + ε/K, applied once, by the pipeline.
    mixup_alpha=0.0,  # mixup with λ ~ Beta(α, α) per batch; 0 = off.
    randaugment_layers=0,  # RandAugment ops per image (vit_jax.data.randaugment); 0 = off.
    randaugment_magnitude=10,  # RandAugment magnitude, 0-30 scale as in AugReg.
    eval_crop_fraction=1.0,  # eval: central crop of this fraction of the shorter side; 1 = none.
    num_channels=3,  # channels fed to the model (grayscale is repeated to 3 and vice versa).
)
