"""Hugging Face transformers `ViTModel` / `ViTForImageClassification` ⇄ our layout.

A folder with `config.json` (model_type 'vit') and `model.safetensors`. Classification weights carry a
`vit.` prefix and a `classifier`; a bare `ViTModel` has no prefix and may have a `pooler` (Dense + tanh
on the class token), which is exactly our pre-logits layer with no head. q/k/v are separate Linears
(torch (out, in) layout), so with the config's `num_attention_heads` they reshape to our kernels.

Representable: class-token pooling, learned posemb covering the class token, fixed sin-cos posemb
(written as the learned table it equals, with a zero row for the class token), qkv bias or none, exact
or tanh GELU, any LayerNorm epsilon, any image size; `num_classes == 0` is written as a `ViTModel` (with
its pooler when the model has pre-logits). Not representable (ValueError): registers, LayerScale,
qk-norm, MAP or mean pooling, fc_norm, no posemb, a learned posemb not covering the class token, and
pre-logits together with a head. Not in HF's config: the scan layout; our files keep the full config
under the `vit_jax` key of config.json, and the input convention in `preprocessor_config.json`, which
HF's `ViTImageProcessor` reads (image_mean, image_std; we read them back too).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vit_jax.interop import input_convention
from vit_jax.interop.formats import layout
from vit_jax.interop.formats.source import EMBEDDED_KEY, Source
from vit_jax.model.config import ViTConfig

NAME = "hf"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
SUFFIXES = ("",)  # a folder
SOURCE_DEFAULTS = ViTConfig(gelu_approximate=False, layernorm_epsilon=1e-12)
# transformers' ACT2FN names → our GELU flavour.
_GELUS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}
_ATTENTION = {
    "query": "attention.attention.query",
    "key": "attention.attention.key",
    "value": "attention.attention.value",
    "out": "attention.output.dense",
}
_BLOCK = {
    "LayerNorm_0": "layernorm_before",
    "LayerNorm_2": "layernorm_after",
    "MlpBlock_3/Dense_0": "intermediate.dense",
    "MlpBlock_3/Dense_1": "output.dense",
}


def looks_like(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "vit"


def _hf_keys(keys: Any) -> bool:
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings")) for k in keys)


def detect(source: Source) -> bool:
    if source.is_dir:
        return looks_like(source.config_json or {})
    return source.kind in ("safetensors", "torch") and _hf_keys(source.keys)


def read(source: Source, hints: dict[str, Any]) -> layout.Converted:
    if source.config_json is None:
        raise ValueError(
            f"{source.path}: Hugging Face ViT weights need their config.json beside them"
        )
    converted = to_ours(source.tensors, hints, source.config_json)
    converted.preprocessing = processor_preprocessing(source.sibling_json(PREPROCESSOR_FILE))
    return converted


def processor_preprocessing(processor: dict[str, Any] | None) -> input_convention.Preprocessing:
    """An HF image processor config → our convention; absent: ViTImageProcessor's defaults (0.5)."""
    processor = processor or {}
    if processor.get("do_normalize", True) is False:
        return input_convention.Preprocessing(mean=(0.0,), std=(1.0,))
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(processor.get("resample", 2))
    return input_convention.Preprocessing(
        mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        std=processor.get("image_std", (0.5, 0.5, 0.5)),
        resize=resample or "bilinear",
    )


def processor_config(config: ViTConfig, pre: input_convention.Preprocessing) -> dict[str, Any]:
    """`preprocessor_config.json` for HF's ViTImageProcessor."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": config.image_size[0], "width": config.image_size[1]},
        "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}[pre.resize],
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
    }


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What an HF ViT config says that the weights do not."""
    act = hf.get("hidden_act", "gelu")
    if act not in _GELUS:
        raise ValueError(f"HF config hidden_act={act!r}: allowed {sorted(_GELUS)}")
    if hf.get("pooler_act", "tanh") != "tanh":
        raise ValueError(
            f"HF config pooler_act={hf['pooler_act']!r}: only 'tanh' has a counterpart"
        )
    fields = dict(gelu_approximate=_GELUS[act], pool="token", class_token=True)
    renames = dict(num_attention_heads="num_heads", layer_norm_eps="layernorm_epsilon")
    renames |= dict(image_size="image_size", qkv_bias="qkv_bias")
    fields |= {ours: hf[theirs] for theirs, ours in renames.items() if theirs in hf}
    return fields


def _kernel(weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(weight.T).reshape(shape)


def to_ours(
    state: dict[str, np.ndarray], hints: dict[str, Any], hf: dict[str, Any] | None = None
) -> layout.Converted:
    del hints  # the HF config says what the weights do not
    fields = config_fields(hf or {})
    original = {k.removeprefix("vit."): k for k in state}  # for error messages
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    params, origin, used = {}, {}, set()
    # Not part of the forward pass we model: a mask token (masked image modeling), and a pooler
    # beside a classifier (the classifier reads the class token, not the pooler).
    ignored = {"embeddings.mask_token"}
    if "classifier.weight" in state:
        ignored |= {"pooler.dense.weight", "pooler.dense.bias"}

    def get(theirs: str) -> np.ndarray:
        if theirs not in state:
            raise ValueError(f"HF ViT checkpoint: {theirs!r} is missing")
        return state[theirs]

    def put(ours: str, theirs: str, value: np.ndarray | None = None) -> None:
        params[ours] = get(theirs) if value is None else value
        origin[ours] = original[theirs]
        used.add(theirs)

    conv = get("embeddings.patch_embeddings.projection.weight")
    width = conv.shape[0]
    heads = fields.get("num_heads", ViTConfig().num_heads)
    heads = heads if width % heads == 0 else 1  # config and weights disagree: the check reports it
    projection = "embeddings.patch_embeddings.projection"
    put(
        "embedding/kernel", f"{projection}.weight", np.ascontiguousarray(conv.transpose(2, 3, 1, 0))
    )
    put("embedding/bias", f"{projection}.bias")
    put("cls", "embeddings.cls_token")
    put(layout.POSEMB, "embeddings.position_embeddings")

    def dense(ours: str, theirs: str, kernel_shape=(-1,), bias_shape=(-1,)) -> None:
        weight = get(f"{theirs}.weight")
        put(f"{ours}/kernel", f"{theirs}.weight", _kernel(weight, (weight.shape[1], *kernel_shape)))
        if f"{theirs}.bias" in state:
            put(f"{ours}/bias", f"{theirs}.bias", state[f"{theirs}.bias"].reshape(bias_shape))

    def norm(ours: str, theirs: str) -> None:
        put(f"{ours}/scale", f"{theirs}.weight")
        put(f"{ours}/bias", f"{theirs}.bias")

    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    for i in layers:
        ours, theirs = layout.BLOCK.format(i), f"encoder.layer.{i}"
        attn = layout.ATTN.format(i)
        for name in ("query", "key", "value"):
            dense(f"{attn}/{name}", f"{theirs}.{_ATTENTION[name]}", (heads, -1), (heads, -1))
        out = f"{theirs}.{_ATTENTION['out']}"
        put(
            f"{attn}/out/kernel",
            f"{out}.weight",
            _kernel(get(f"{out}.weight"), (heads, -1, width)),
        )
        put(f"{attn}/out/bias", f"{out}.bias")
        norm(f"{ours}/LayerNorm_0", f"{theirs}.{_BLOCK['LayerNorm_0']}")
        norm(f"{ours}/LayerNorm_2", f"{theirs}.{_BLOCK['LayerNorm_2']}")
        dense(f"{ours}/MlpBlock_3/Dense_0", f"{theirs}.{_BLOCK['MlpBlock_3/Dense_0']}")
        dense(f"{ours}/MlpBlock_3/Dense_1", f"{theirs}.{_BLOCK['MlpBlock_3/Dense_1']}")
    norm("Transformer/encoder_norm", "layernorm")
    if "classifier.weight" in state:
        dense("head", "classifier")
    elif "pooler.dense.weight" in state:
        dense("pre_logits", "pooler.dense")
    unknown = [k for k in state if k not in used and k not in ignored]
    if unknown:
        raise ValueError(
            f"HF ViT checkpoint: {unknown[0]!r} {tuple(state[unknown[0]].shape)} has no counterpart "
            f"in this model"
        )
    return layout.Converted(
        params, fields=fields, origin=origin, posemb_covers_prefix=True, defaults=SOURCE_DEFAULTS
    )


def unrepresentable(config: ViTConfig) -> list[str]:
    learned = config.posemb == "learn"
    problems = {
        "registers (num_registers > 0)": config.num_registers,
        "distillation_token": config.distillation_token,
        # HF's hybrids are another class (ViTHybrid, a BiT backbone with its own names).
        "a ResNet stem (hybrid)": config.is_hybrid,
        "LayerScale": config.layerscale_init is not None,
        "qk-norm": config.qk_norm,
        f"pool={config.pool!r} (only 'token')": config.pool != "token",
        "fc_norm": config.fc_norm,
        f"posemb={config.posemb!r} (only 'learn' or 'sincos2d')": config.posemb == "none",
        "a posemb that does not cover the class token": learned and not config.posemb_covers_prefix,
        "pre-logits together with a head": config.representation_size and config.num_classes,
    }
    return [name for name, present in problems.items() if present]


def side_config(config: ViTConfig) -> dict[str, Any]:
    return to_hf_config(config)


def required_hints(config: ViTConfig) -> dict[str, Any]:
    del config  # config.json says the heads
    return {}


def to_hf_config(config: ViTConfig) -> dict[str, Any]:
    square = (
        config.image_size[0] == config.image_size[1]
        and config.patch_size[0] == config.patch_size[1]
    )
    size = lambda pair: pair[0] if square else list(pair)  # noqa: E731
    hf = {
        "architectures": ["ViTForImageClassification" if config.num_classes else "ViTModel"],
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu_pytorch_tanh" if config.gelu_approximate else "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.layernorm_epsilon,
        "image_size": size(config.image_size),
        "patch_size": size(config.patch_size),
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "encoder_stride": config.patch_size[0],
        "pooler_act": "tanh",
        "pooler_output_size": config.representation_size or config.hidden_size,
        "torch_dtype": "float32",
    }
    if config.num_classes:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.num_classes)}
    return hf


def from_ours(flat: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    flat = layout.with_learned_posemb(flat, config, prefix_rows=True)
    # ViTForImageClassification prefixes its backbone with 'vit.'; a bare ViTModel does not.
    prefix = "vit." if config.num_classes else ""
    tensors: dict[str, np.ndarray] = {}

    def dense(theirs: str, ours: str) -> None:
        kernel = flat[f"{ours}/kernel"]
        tensors[f"{theirs}.weight"] = np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)
        if f"{ours}/bias" in flat:
            tensors[f"{theirs}.bias"] = flat[f"{ours}/bias"].reshape(-1)

    def norm(theirs: str, ours: str) -> None:
        tensors[f"{theirs}.weight"], tensors[f"{theirs}.bias"] = (
            flat[f"{ours}/scale"],
            flat[f"{ours}/bias"],
        )

    projection = f"{prefix}embeddings.patch_embeddings.projection"
    tensors[f"{projection}.weight"] = np.ascontiguousarray(
        flat["embedding/kernel"].transpose(3, 2, 0, 1)
    )
    tensors[f"{projection}.bias"] = flat["embedding/bias"]
    tensors[f"{prefix}embeddings.cls_token"] = flat["cls"]
    tensors[f"{prefix}embeddings.position_embeddings"] = flat[layout.POSEMB]
    for i in range(config.num_layers):
        ours, theirs = layout.BLOCK.format(i), f"{prefix}encoder.layer.{i}"
        for name in ("query", "key", "value"):
            dense(f"{theirs}.{_ATTENTION[name]}", f"{layout.ATTN.format(i)}/{name}")
        out = flat[f"{layout.ATTN.format(i)}/out/kernel"]
        tensors[f"{theirs}.{_ATTENTION['out']}.weight"] = np.ascontiguousarray(
            out.reshape(-1, out.shape[-1]).T
        )
        tensors[f"{theirs}.{_ATTENTION['out']}.bias"] = flat[f"{layout.ATTN.format(i)}/out/bias"]
        for name, hf_name in _BLOCK.items():
            (norm if name.startswith("LayerNorm") else dense)(
                f"{theirs}.{hf_name}", f"{ours}/{name}"
            )
    norm(f"{prefix}layernorm", "Transformer/encoder_norm")
    if config.num_classes:
        dense("classifier", "head")
    elif config.representation_size:
        dense("pooler.dense", "pre_logits")
    return tensors


def files(
    path: str, tensors: dict[str, np.ndarray], config: ViTConfig, embedded: str
) -> dict[str, bytes]:
    """A folder: config.json (+ our full config under 'vit_jax'), model.safetensors, preprocessor."""
    from safetensors.numpy import save as safetensors_bytes

    described = json.loads(embedded)
    pre = input_convention.Preprocessing.from_dict(described["preprocessing"])
    # transformers refuses safetensors files without format metadata; torch ignores it.
    weights = safetensors_bytes(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"}
    )
    hf_config = {**to_hf_config(config), EMBEDDED_KEY: described}
    as_json = lambda value: (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()  # noqa: E731
    contents = [weights, as_json(hf_config), as_json(processor_config(config, pre))]
    return dict(zip(outputs(path), contents, strict=True))


def outputs(path: str) -> list[str]:
    return [os.path.join(path, name) for name in (WEIGHTS_FILE, CONFIG_FILE, PREPROCESSOR_FILE)]


def how_to_load(path: str, config: ViTConfig) -> str:
    cls = "ViTForImageClassification" if config.num_classes else "ViTModel"
    return (
        f"from transformers import {cls}, ViTImageProcessor\n"
        f"model = {cls}.from_pretrained({path!r})\n"
        f"processor = ViTImageProcessor.from_pretrained({path!r})"
    )
