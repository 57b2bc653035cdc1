r"""Fine-tuning a pre-trained ViT, the ViT paper's recipe (Dosovitskiy et al. 2020, App. B.1.1).

  python train.py --config configs/finetune.py:ViT-B/16,cifar10 --workdir workdirs/ft_cifar10
  python train.py --config configs/finetune.py:ViT-B/16,/data/my_images --workdir workdirs/ft_mine \
      --config.init_from=/ckpts/ViT-B_16.npz

Argument: `<variant>,<dataset>` with dataset one of `cifar10`, `cifar100`, `oxford_iiit_pet`,
`imagenet2012`, or a path to an image folder `<root>/{train,test}/<class>/*.jpg` (default
`ViT-B/16,cifar10`).

`config.init_from` defaults to the published ImageNet-21k checkpoint of the variant,
gs://vit_models/imagenet21k/<variant>.npz (needs network; download it once and pass the local path
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
}
IMAGE_FOLDER = ("train", "test", 2_500)


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
    name = "ViT-" + variant.strip().removeprefix("ViT-").replace("/", "_")  # e.g. ViT-B_16
    config.init_from = f"gs://vit_models/imagenet21k/{name}.npz"

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
    return config
