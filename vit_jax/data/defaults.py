"""Default preprocessing options, in a module free of TensorFlow so config files can import it."""

PREPROCESSING_DEFAULTS = dict(
    crop_area_range=(0.05, 1.0),
    crop_aspect_range=(3 / 4, 4 / 3),
    flip=True,
    translate_pixels=0,
    label_smoothing=0.0,
    mixup_alpha=0.0,
    randaugment_layers=0,
    randaugment_magnitude=10,
    eval_crop_fraction=1.0,
    num_channels=3,
)
