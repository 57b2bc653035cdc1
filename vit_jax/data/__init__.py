"""The input pipeline's parts; `vit_jax.input_pipeline` puts them together.

* `preprocess`: decode, crops, resize, flip, normalization, labels, mixup (tf.data ops).
* `randaugment`: RandAugment in TF ops.
* `validation`: config and dataset checks with clear errors.
* `benchmark`: `python -m vit_jax.data.benchmark` measures input images/s.
* `defaults`: the preprocessing defaults, free of TensorFlow so config files can import them.
"""
