r"""Fine-tuning a pre-trained ViT, the ViT paper's recipe (Dosovitskiy et al. 2020, App. B.1.1).

  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft_cifar10
  python train.py --config configs/finetune.py:R50+ViT-B/16,cifar10 --workdir workdirs/ft_r50
  python train.py --config configs/finetune.py:ViT-B/16,/data/my_images --workdir workdirs/ft_mine \
      --config.init_from=/ckpts/ViT-B_16.npz

Argument: `<variant>,<dataset>` with dataset one of `cifar10`, `cifar100`, `oxford_iiit_pet`,
`imagenet2012`, `digits` (offline, 32 px; see `_digits`), or a path to an image folder
`<root>/{train,test}/<class>/*.jpg` (default `ViT-B/16,cifar10`).

`config.init_from` defaults to the published ImageNet-21k checkpoint of the variant,
gs://vit_models/imagenet21k/<variant>.npz (a hybrid's: `R50+ViT-B_16.npz` there, AugReg's
`R26_S_32-i21k-...npz` for `R26+ViT-S/32`; needs network; download it once and pass the local path
offline), and may be any checkpoint of this project (`<workdir>` of a pre-training run). The
position embeddings are resized to the 384 px grid, the pre-training head and pre-logits are
replaced by a zero-initialized linear head for the new classes; any other difference between the
checkpoint and the variant is an error naming the parameter.

The recipe: SGD with momentum 0.9, batch 512, lr 0.03 (the paper sweeps {0.001, 0.003, 0.01,
0.03}), 500 warmup steps then cosine decay, global-norm clipping at 1, no weight decay, 384 px,
steps per dataset as in the paper's Table 4 (ImageNet 20k, CIFAR 10k, Pets 500, other 2.5k).

Expected (the paper's Table 5, ViT-B/16 pre-trained on ImageNet-21k, fine-tuned at 384 px; not run
in this repository): CIFAR-10 98.1%, CIFAR-100 87.1%, Oxford-IIIT Pets 93.8%, ImageNet 84.0%.
"""

import ml_collections

from configs import common

DATASETS = {
    # dataset: (train split, eval split, steps)
    "cifar10": ("train", "test", 10_000),
    "cifar100": ("train", "test", 10_000),
    "oxford_iiit_pet": ("train", "test", 500),
    "imagenet2012": ("train", "validation", 20_000),
    "digits": ("train", "test", 500),  # offline; a checkpoint pre-trained on fractals (below)
}
IMAGE_FOLDER = ("train", "test", 2_500)


def _imagenet21k_checkpoint(variant: str) -> str:
    """The published ImageNet-21k file of `variant` (a hybrid's from the named-checkpoint table)."""
    variant = variant.strip()
    if variant.startswith("R"):  # R50+ViT-B/16 (the paper's), R26+ViT-S/32, ... (AugReg's)
        from vit_jax.interop import pretrained

        names = [e["pretrained"] for e in pretrained.list_pretrained(variant)]
        name = next((n for n in ("i21k", "augreg-i21k") if n in names), None)
        if name is None:
            return ""  # no published upstream: the user sets config.init_from
        return "gs://" + pretrained.find(variant, name).path
    name = "ViT-" + variant.removeprefix("ViT-").replace("/", "_")  # e.g. ViT-B_16
    return f"gs://vit_models/imagenet21k/{name}.npz"


def get_config(arg: str | None = None):
    variant, dataset = (arg or "ViT-B/16,cifar10").split(",", 1)
    is_folder = "/" in dataset or dataset.startswith(".")
    if dataset not in DATASETS and not is_folder:
        raise ValueError(
            f"finetune.py:<variant>,<dataset>: dataset {dataset!r}; allowed: {list(DATASETS)} "
            f"or a path to an image folder"
        )
    train_split, eval_split, steps = IMAGE_FOLDER if is_folder else DATASETS[dataset]
    config = common.get_config()

    config.dataset = dataset
    config.train_split = train_split
    config.eval_split = eval_split
    config.image_size = 384
    config.batch_size = 512
    config.eval_batch_size = 512
    config.shuffle_buffer_size = 50_000
    config.pp.crop_area_range = (0.05, 1.0)
    config.pp.flip = True

    # The linear head of fine-tuning: no pre-logits layer (the checkpoint's is dropped).
    config.model = common.model_fields(variant, representation_size=None)
    config.init_from = _imagenet21k_checkpoint(variant)

    config.total_steps = steps
    config.optim.name = "sgd"
    config.optim.kwargs = ml_collections.ConfigDict(dict(momentum=0.9))
    config.optim.learning_rate = 0.03
    config.optim.weight_decay = 0.0
    config.optim.grad_clip_norm = 1.0
    config.schedule.name = "cosine"
    # 500 steps (at most half the run), as a fraction so a shorter --config.total_steps scales it.
    config.schedule.warmup_fraction = min(500, steps // 2) / steps

    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    if dataset == "digits":
        _digits(config)
    return config


def _digits(config) -> None:
    """digits (1,437 train images, 8x8 gray): 32 px (4x4 patches: one token per original pixel,
    as configs/digits.py), the gray repeated to the model's 3 channels, shifts instead of crops,
    batch 64, lr 0.01 with 10 % warmup (untuned), no published checkpoint: from scratch unless `--config.init_from` names one, e.g. the
    workdir of `configs/pretrain.py:ViT-Ti/4,fractaldb/c100_i100_r32` (its position embeddings are
    resized when its resolution was not 32, its head replaced for the 10 classes)."""
    config.image_size = 32
    config.batch_size = 64
    config.eval_batch_size = 360
    config.shuffle_buffer_size = 1437
    config.pp.crop_area_range = None
    config.pp.flip = False
    config.pp.translate_pixels = 4
    config.pp.num_channels = 3
    config.init_from = ""
    config.optim.learning_rate = 0.01
    config.schedule.warmup_fraction = 0.1
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
