"""vit-jax: Vision Transformers in JAX/Flax.

Public API:
  create_model(variant, num_classes=..., **overrides) -> linen VisionTransformer
  ViTConfig, get_config                      the model's hyperparameters
  load_pretrained(path, ...) -> (model, params)   any public ViT checkpoint (vit_jax, big_vision, timm, HF)
  load_pretrained('ViT-B/16', pretrained='augreg-i21k-ft-i1k')   a public checkpoint by name
  list_pretrained()                          what names exist, with their inputs and accuracy
  save_pretrained(params, path, format=..., model=..., preprocessing=...)
      format: npz | timm | hf (weights) or onnx | savedmodel | tflite | stablehlo (deployment;
      with_preprocessing=, quantize='dynamic_int8', batch=, input_size=, labels=)
"""

from vit_jax.model.config import ViTConfig, get_config
from vit_jax.model.vit import VisionTransformer, count_params, create_model, init_params, patchify

__all__ = [
    "ViTConfig",
    "VisionTransformer",
    "count_params",
    "create_model",
    "get_config",
    "init_params",
    "list_pretrained",
    "load_pretrained",
    "patchify",
    "save_pretrained",
]


def __getattr__(name):
    # Interop pulls in safetensors and friends; import it only when asked for.
    if name == "load_pretrained":
        from vit_jax.interop import load

        return load.load_pretrained
    if name == "save_pretrained":  # weights (npz, timm, hf) or a deployed file (onnx, ...)
        from vit_jax.interop import deploy

        return deploy.save_pretrained
    if name == "list_pretrained":
        from vit_jax.interop import pretrained

        return pretrained.list_pretrained
    raise AttributeError(f"module 'vit_jax' has no attribute {name!r}")
