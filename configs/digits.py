r"""A small ViT trained from scratch on the offline 8x8 digits (the main job's default).

  python train.py --config configs/digits.py --workdir workdirs/digits

DRAFT: being tuned; numbers below are placeholders.
"""

from configs import common

EPOCHS = 100
BATCH = 128
TRAIN_EXAMPLES = 1437


def get_config():
    config = common.get_config()

    config.dataset = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 32
    config.batch_size = BATCH
    config.eval_batch_size = 360
    config.shuffle_buffer_size = TRAIN_EXAMPLES
    config.pp.crop_area_range = None
    config.pp.crop_aspect_range = (3 / 4, 4 / 3)
    config.pp.flip = False
    config.pp.translate_pixels = 4
    config.pp.label_smoothing = 0.1
    config.pp.mixup_alpha = 0.2
    config.pp.randaugment_layers = 0
    config.pp.num_channels = 1

    config.model = common.model_config(
        None,
        hidden_size=128,
        num_layers=6,
        num_heads=4,
        mlp_dim=256,
        patch_size=8,
        pool="gap",
        posemb="sincos2d",
        drop_path_rate=0.1,
    )

    config.total_epochs = float(EPOCHS)
    config.optim.name = "adamw"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 0.05
    config.optim.grad_clip_norm = 1.0
    config.schedule.name = "cosine"
    config.schedule.warmup_steps = 5 * TRAIN_EXAMPLES // BATCH

    config.log_every_steps = 110
    config.eval_every_steps = 275
    config.checkpoint_every_steps = 0
    return config
