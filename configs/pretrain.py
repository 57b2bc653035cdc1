r"""Upstream pre-training, the ViT paper's recipe (Dosovitskiy et al. 2020, Sec. 4.1 and Table 3).

  python train.py --config configs/pretrain.py:ViT-B/16,imagenet2012 --workdir workdirs/b16_i1k
  python train.py --config configs/pretrain.py:ViT-B/16,imagenet21k --workdir workdirs/b16_i21k \
      --config.data_dir=/path/to/tfds

Argument: `<variant>,<dataset>` with dataset `imagenet2012` or `imagenet21k` (default
`ViT-B/16,imagenet2012`). ImageNet must already be prepared in `config.data_dir` (TFDS cannot
download it); ImageNet-21k is not in the TFDS catalog: prepare a TFDS dataset named `imagenet21k`
with one split `full` (as big_vision does), or set `--config.dataset=/path/to/folder`.

The recipe: Adam (β1 0.9, β2 0.999), batch 4096, peak lr 1e-3 after 10k linear warmup steps, then
linear decay (`--config.schedule.name=cosine` for cosine), weight decay decoupled as in AdamW and not
applied to biases, norms, position embeddings or the class token (paper: 0.3 on ImageNet, 0.03 on
ImageNet-21k; big weight decay is what makes Adam work for ViT), global-norm clipping at 1, a
pre-logits layer (Dense + tanh) during pre-training, dropout 0.1, 300 epochs on ImageNet and 90 on
ImageNet-21k, bfloat16 activations with float32 master weights. ImageNet-21k images often have
several labels, so it uses big_vision's sigmoid cross-entropy with the head bias starting at -10:
every class starts near probability 0, so the 21,842 absent classes do not swamp the loss. Its eval
split is a held-out "minival" of 51,200 images, as in big_vision.

AugReg (Steiner et al. 2021) options: `--config.pp.mixup_alpha=0.2 --config.pp.randaugment_layers=2
--config.pp.randaugment_magnitude=15` (and usually less weight decay / dropout then).
Large models: `--config.mesh.fsdp=8` shards parameters and optimizer state over 8 devices;
`--config.optim.kwargs.mu_dtype=bfloat16` halves the first moment; `--config.model.remat_policy=full`.

Expected (the paper's numbers, after fine-tuning at 384 px; this recipe has not been run at this
scale in this repository): ViT-B/16 ImageNet-only 77.9% ImageNet top-1; ViT-B/16 pre-trained on
ImageNet-21k 84.0%.

Offline, on generated fractals (FractalDB-style, `vit_jax/data/builders/fractals.py`; prepared on
first use into `config.data_dir`, ~1,300 32-px images/s per core)::

  python train.py --config configs/pretrain.py:ViT-Ti/4,fractaldb/c100_i100_r32 \
      --workdir workdirs/fractal_ti4 --config.data_dir=DIR
  python train.py --config configs/finetune.py:ViT-Ti/4,digits --workdir workdirs/ft_digits \
      --config.init_from=workdirs/fractal_ti4 --config.data_dir=DIR

`fractaldb/<name>` is any name of the builder (`c1000_i1000_r224` is FractalDB-1k); the image size
is the dataset's resolution (an error if it is below the patch size), AdamW lr 1e-3 with weight
decay 0.05 (DeiT's weight decay; the rest is our choice), batch 256, 30 epochs with 5 % warmup and
cosine decay, Inception crops of 35-100 % of the area, flips, label smoothing 0.1, stochastic depth
0.1, the pre-logits layer as above (dropped when fine-tuning). Not run to the end here, so no
accuracy to state: on this idle 2-core CPU, ViT-Ti/4 at 32 px (65 tokens, 5.4 M parameters)
trains at 47-48 img/s after compiling (12 steps of 256 on `c100_i300_r32` with
`--config.total_steps=12`, 2026-12-03; 3 img/s under load ~10 the day before), so the toy's 30
epochs (300,000 images) take ~1.7 hours here: a job for an accelerator; `--config.total_epochs`
shortens it. Preparing `c100_i100_r32` took 69 s with 2 workers under load, `c100_i300_r32` 15 s
idle. A model that does pre-train here in minutes is the digits recipe's own
(`configs/digits.py:fractal`, 215k parameters, 10 epochs of `c100_i300_r32`): its transfer to
digits is the README's table (`python benchmarks/digits_tables.py transfer`).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

DATASETS = {
    # dataset: (train split, eval split, epochs, weight decay, head bias init, loss)
    "imagenet2012": ("train", "validation", 300, 0.3, 0.0, "softmax_xent"),
    "imagenet21k": ("full[51200:]", "full[:51200]", 90, 0.03, -10.0, "sigmoid_xent"),
}


def get_config(arg: str | None = None):
    variant, dataset = (arg or "ViT-B/16,imagenet2012").split(",")
    if dataset.startswith("fractaldb/"):
        return fractal_config(variant, dataset)
    if dataset not in DATASETS:
        raise ValueError(
            f"pretrain.py:<variant>,<dataset>: dataset {dataset!r}; allowed: {list(DATASETS)} "
            "or fractaldb/<name> (vit_jax/data/builders/fractals.py)"
        )
    train_split, eval_split, epochs, weight_decay, head_bias, loss = DATASETS[dataset]
    config = common.get_config()

    config.dataset = dataset
    config.train_split = train_split
    config.eval_split = eval_split
    config.image_size = 224
    config.batch_size = 4096
    config.eval_batch_size = 1024
    config.shuffle_buffer_size = 250_000
    config.pp.crop_area_range = (0.05, 1.0)  # Inception crop
    config.pp.flip = True

    width = common.model_fields(variant).hidden_size
    config.model = common.model_fields(
        variant,
        representation_size=width,  # the pre-training MLP head: Dense + tanh, dropped for fine-tuning
        dropout_rate=0.1,
        head_bias_init=head_bias,
        dtype="bfloat16",
    )

    config.loss = loss
    config.total_epochs = epochs
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    # mu_dtype: 'bfloat16' halves the first moment's memory (None = the params' dtype).
    config.optim.kwargs = ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.999, mu_dtype=config_dict.placeholder(str))
    )
    config.optim.weight_decay = weight_decay
    config.optim.grad_clip_norm = 1.0
    config.schedule.name = "linear"
    config.schedule.warmup_steps = 10_000

    config.log_every_steps = 100
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 2_000
    return config


FRACTAL_EPOCHS = 30


def fractal_config(variant: str, dataset: str):
    """Pre-training on generated fractals (`fractaldb/<name>`, FractalDB-style, offline; the
    module docstring's second part): the images' own resolution, the variant's patches."""
    from vit_jax.data.builders import fractals  # TFDS: only for this recipe

    resolution = fractals.resolution_of(dataset)  # a bad name is an error here, naming it
    patch = common.model_fields(variant).patch_size[0]
    if resolution < patch:
        raise ValueError(
            f"pretrain.py:{variant},{dataset}: the images are {resolution} px, smaller than the "
            f"model's {patch} px patches; use a larger resolution (r{patch} or more) or a smaller "
            "patch size (e.g. ViT-Ti/4)."
        )
    config = common.get_config()
    config.dataset = dataset
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = resolution
    config.batch_size = 256
    config.eval_batch_size = 500
    config.pp.crop_area_range = (0.35, 1.0)  # milder than ImageNet's: a fractal fills the image
    config.pp.flip = True
    config.pp.label_smoothing = 0.1
    width = common.model_fields(variant).hidden_size
    config.model = common.model_fields(variant, representation_size=width, drop_path_rate=0.1)
    config.total_epochs = float(FRACTAL_EPOCHS)
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 1.0
    config.schedule.name = "cosine"
    config.schedule.warmup_fraction = 0.05
    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 500
    return config
