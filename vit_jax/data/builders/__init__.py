"""TFDS builders that ship with vit_jax; importing this package registers them with TFDS.

* `digits`: scikit-learn's 1,797 real 8x8 handwritten digits (offline; see `digits.py`).
* `vit_image_folder`: a `<root>/<split>/<class_name>/*.{jpg,jpeg,png}` folder, prepared into
  TFRecords on first use (see `image_folder.py`).
* `fractaldb`: FractalDB-style fractal images from iterated function systems, any number of
  classes, instances and resolution, generated offline (`fractaldb/c100_i100_r32`; see
  `fractals.py`, the formulas in `fractal_ifs.py`).
"""

from vit_jax.data.builders import digits, fractals, image_folder
from vit_jax.data.builders.image_folder import image_folder_builder

__all__ = ["digits", "fractals", "image_folder", "image_folder_builder"]
