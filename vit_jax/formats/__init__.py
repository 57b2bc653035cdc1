"""Translations between this project's parameter layout and other libraries' checkpoint layouts.

Only these modules know other libraries' parameter names. Each foreign layout is translated to our flat
loop layout (`layout.Converted`) on the way in, and from it on the way out; `layout.infer_config` then
reads the model's hyperparameters off the shapes, the same way for every source.

  vit_jax_npz  published google-research/vision_transformer `.npz` (also what we write as 'npz')
  big_vision   google-research/big_vision `.npz` (renames only; read through vit_jax_npz)
  timm         timm `VisionTransformer` state dicts
  hf           Hugging Face `ViTModel` / `ViTForImageClassification` folders
"""
