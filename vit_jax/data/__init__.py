"""The input pipeline's parts; `vit_jax.input_pipeline` puts them together.

* `preprocess`: decode, crops, resize, flip, normalization, labels, mixup (tf.data ops).
* `randaugment`: RandAugment in TF ops.
* `validation`: config and dataset checks with clear errors.
* `input_benchmark`: `python -m vit_jax.data.input_benchmark` measures input images/s.
* `defaults`: every data field's default and meaning, free of TensorFlow so config files import them.
"""
