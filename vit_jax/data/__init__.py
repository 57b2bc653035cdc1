"""The input pipeline: `get_datasets(config)` → `Data`, the one face over the parts below.

    data = vit_jax.data.get_datasets(config)    # validates, opens (prepares) the dataset
    data.train_iter(start_step)                   # per-process numpy batches, restartable
    data.eval_iter()                              # padded + masked: every example counted once

* `pipeline`: `get_datasets` and `Data` (tf.data over the opened dataset).
* `sources`: `config.dataset` → a prepared TFDS builder; per-process shares of a split.
* `preprocess`: decode, crops, resize, flip, normalization, labels, mixup (tf.data ops).
* `randaugment`: RandAugment in TF ops.
* `on_device`: `config.data_on_device`, a small train split held and augmented on the devices.
* `validation`: config and dataset checks with clear errors.
* `defaults`: every data field's default and meaning, free of TensorFlow so config files import them.
* `builders/`: the TFDS builders that ship with vit_jax (digits, image folders, fractaldb).

The face is imported lazily: `vit_jax.data.defaults` (read by every config file) loads no TensorFlow.
"""

__all__ = ["Data", "default_data_config", "get_datasets"]


def __getattr__(name):
    if name in __all__:
        from vit_jax.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'vit_jax.data' has no attribute {name!r}")
