"""timm `VisionTransformer` state dicts ⇄ our layout, and timm's own model names and config.json.

Torch layouts: a Linear stores (out, in), so our kernels are its transpose; the patch conv is OIHW (ours
HWIO); attention input projections are fused into one `qkv` Linear (3·D, D) whose rows are [q; k; v],
each (heads, head_dim) flattened. The fused weight does not tell the number of heads: it comes from the
caller (`num_heads`, or a variant such as 'ViT-B/16' or a timm name such as 'deit_tiny_patch16_224'),
from a timm config.json (`model_args`), or from the q/k-norm weights (head_dim,) when the model has them.

Representable: class token or none, registers (`reg_token`), learned posemb covering the prefix tokens
or not (`no_embed_class`), fixed sin-cos posemb (written as the learned `pos_embed` table it equals,
timm has no sin-cos), no posemb, qk-norm, LayerScale (`ls1`/`ls2`), token/avg/MAP (`attn_pool`) pooling,
`fc_norm`, qkv bias or none, exact or tanh GELU (`act_layer='gelu_tanh'`), the hybrids' ResNetV2
backbone (`timm_hybrid.py`). Not representable
(ValueError): a pre-logits layer (timm's VisionTransformer has none).
Not in the tensors (`save.reload_overrides` lists them): heads (unless qk-norm), GELU flavour and
LayerNorm epsilon (read back as timm's exact GELU and 1e-6), mean pooling with a class token and no
fc_norm, the image size when there is no posemb or its grid is not square, and the scan layout. What we
write says all of it twice: our full config in the safetensors metadata, and timm's own config.json
(`architecture` + `model_args` + `pretrained_cfg` mean/std) for `timm.create_model`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from vit_jax.interop import input_convention
from vit_jax.interop.formats import layout, timm_hybrid
from vit_jax.interop.formats.source import Source
from vit_jax.interop.formats.timm_config import (
    architecture,
    hub_config,
    hub_config_hints,
    hub_preprocessing,
    model_args,
    not_in_hub_config,
)
from vit_jax.model.config import ViTConfig

NAME = "timm"
SOURCE_DEFAULTS = ViTConfig(
    gelu_approximate=False,
    layernorm_epsilon=1e-6,
    resnet_norm_epsilon=1e-5,  # hybrids: timm's GroupNorm and StdConv2dSame epsilons
    resnet_ws_epsilon=1e-8,
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SUFFIXES = (".safetensors", "")  # a file, or a hub folder when `path` has no suffix


def looks_like(keys: Any) -> bool:
    return any(key.endswith("patch_embed.proj.weight") for key in keys)


def detect(source: Source) -> bool:
    if source.is_dir:  # a timm hub folder
        return "architecture" in (source.config_json or {}) and looks_like(source.keys)
    return source.kind in ("safetensors", "torch") and looks_like(source.keys)


def read(source: Source, hints: dict[str, Any]) -> layout.Converted:
    hub = source.config_json if source.is_dir else None
    hub_hints = hub_config_hints(hub) if hub else {}
    converted = to_ours(source.tensors, {**hub_hints, **hints})
    converted.fields.update(hub_hints)  # what the folder says about the model
    converted.preprocessing = hub_preprocessing(hub) if hub else None
    return converted


def strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Drop a wrapper's prefix ('module.' of DDP, 'model.' of some training scripts)."""
    prefix = next(k for k in state if k.endswith("patch_embed.proj.weight"))[
        : -len("patch_embed.proj.weight")
    ]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _heads_in(w_rows: np.ndarray, heads: int) -> np.ndarray:
    """(heads·head_dim, D) torch rows → our (D, heads, head_dim) kernel."""
    return _linear(w_rows).reshape(w_rows.shape[1], heads, -1)


def _num_heads(state: dict[str, np.ndarray], hints: dict[str, Any]) -> int:
    width = state["patch_embed.proj.weight"].shape[0]
    if "blocks.0.attn.q_norm.weight" in state:
        return width // state["blocks.0.attn.q_norm.weight"].shape[0]
    heads = hints.get("num_heads")
    if heads is None:
        raise ValueError(
            "timm checkpoint: a fused 'blocks.*.attn.qkv.weight' does not tell the number of "
            "heads; pass num_heads=..., or variant='ViT-B/16' or a timm name such as "
            "'vit_base_patch16_224'"
        )
    # A variant meant for another width: convert with one head; the width mismatch (at the patch
    # embedding, before any attention weight) is what gets reported.
    return heads if width % heads == 0 else 1


def _attention(put, get, ours: str, theirs: str, heads: int, state: dict) -> None:
    """Self-attention (fused qkv) or MAP-head attention (q, fused kv) → query/key/value/out."""
    if f"{theirs}.qkv.weight" in state:
        fused = {"qkv": ("query", "key", "value")}
    else:
        fused = {"q": ("query",), "kv": ("key", "value")}
    for name, parts in fused.items():
        weight = get(f"{theirs}.{name}.weight")
        bias = state.get(f"{theirs}.{name}.bias")
        for i, part in enumerate(parts):
            rows = slice(i * weight.shape[1], (i + 1) * weight.shape[1])
            put(f"{ours}/{part}/kernel", _heads_in(weight[rows], heads), f"{theirs}.{name}.weight")
            if bias is not None:
                put(f"{ours}/{part}/bias", bias[rows].reshape(heads, -1), f"{theirs}.{name}.bias")
    out = get(f"{theirs}.proj.weight")
    put(
        f"{ours}/out/kernel", _linear(out).reshape(heads, -1, out.shape[0]), f"{theirs}.proj.weight"
    )
    put(f"{ours}/out/bias", get(f"{theirs}.proj.bias"), f"{theirs}.proj.bias")
    for norm, name in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
        if f"{theirs}.{norm}.weight" in state:
            put(f"{ours}/{name}/scale", get(f"{theirs}.{norm}.weight"), f"{theirs}.{norm}.weight")
            put(f"{ours}/{name}/bias", get(f"{theirs}.{norm}.bias"), f"{theirs}.{norm}.bias")


def to_ours(
    state: dict[str, np.ndarray], hints: dict[str, Any], side: Any = None
) -> layout.Converted:
    del side  # a bare state dict; hub folders pass their config as hints
    state = strip_prefix(state)
    heads = _num_heads(state, hints)
    params, origin, used = {}, {}, set()

    def get(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"timm checkpoint: {key!r} is missing")
        used.add(key)
        return state[key]

    def put(ours: str, value: np.ndarray, theirs: str) -> None:
        params[ours], origin[ours] = value, theirs
        used.add(theirs)

    def norm(ours: str, theirs: str) -> None:
        put(f"{ours}/scale", get(f"{theirs}.weight"), f"{theirs}.weight")
        put(f"{ours}/bias", get(f"{theirs}.bias"), f"{theirs}.bias")

    def dense(ours: str, theirs: str) -> None:
        put(f"{ours}/kernel", _linear(get(f"{theirs}.weight")), f"{theirs}.weight")
        if f"{theirs}.bias" in state:
            put(f"{ours}/bias", get(f"{theirs}.bias"), f"{theirs}.bias")

    conv = get("patch_embed.proj.weight")
    put(
        "embedding/kernel",
        np.ascontiguousarray(conv.transpose(2, 3, 1, 0)),
        "patch_embed.proj.weight",
    )
    if "patch_embed.proj.bias" in state:
        put("embedding/bias", get("patch_embed.proj.bias"), "patch_embed.proj.bias")
    if timm_hybrid.has_backbone(state):  # HybridEmbed: a ResNet before the patch embedding
        timm_hybrid.to_ours(state, get, put)
    for theirs, ours in (
        ("cls_token", "cls"),
        ("dist_token", "dist"),
        ("reg_token", "registers"),
        ("pos_embed", layout.POSEMB),
    ):
        if theirs in state:
            put(ours, get(theirs), theirs)
    blocks = {int(m[1]) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    for i in sorted(blocks):
        ours, theirs = layout.BLOCK.format(i), f"blocks.{i}"
        norm(f"{ours}/LayerNorm_0", f"{theirs}.norm1")
        _attention(put, get, layout.ATTN.format(i), f"{theirs}.attn", heads, state)
        norm(f"{ours}/LayerNorm_2", f"{theirs}.norm2")
        dense(f"{ours}/MlpBlock_3/Dense_0", f"{theirs}.mlp.fc1")
        dense(f"{ours}/MlpBlock_3/Dense_1", f"{theirs}.mlp.fc2")
        for ls, name in (("ls1", "layerscale_attn"), ("ls2", "layerscale_mlp")):
            if f"{theirs}.{ls}.gamma" in state:
                put(f"{ours}/{name}", get(f"{theirs}.{ls}.gamma"), f"{theirs}.{ls}.gamma")
    if "attn_pool.latent" in state:
        latent = get("attn_pool.latent")
        if latent.shape[1] != 1:
            raise ValueError(
                f"timm 'attn_pool.latent' {latent.shape}: only one latent query is supported"
            )
        put("MAPHead_0/probe", latent, "attn_pool.latent")
        _attention(put, get, "MAPHead_0/MultiHeadDotProductAttention_0", "attn_pool", heads, state)
        norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
        dense("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        dense("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    for theirs, ours in (("norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
        if f"{theirs}.weight" in state:
            norm(ours, theirs)
    for head in ("head", "head_dist"):  # head_dist: DeiT's distillation head
        if f"{head}.weight" in state:
            dense(head, head)
    unknown = [key for key in state if key not in used]
    if unknown:
        raise ValueError(
            f"timm checkpoint: {unknown[0]!r} {tuple(state[unknown[0]].shape)} has no counterpart in "
            f"this model (unsupported timm option)"
        )
    return layout.Converted(
        params, origin=origin, posemb_without_param="none", defaults=SOURCE_DEFAULTS
    )


def unrepresentable(config: ViTConfig) -> list[str]:
    return ["a pre-logits layer"] if config.representation_size is not None else []


def side_config(config: ViTConfig) -> None:
    del config


def required_hints(config: ViTConfig) -> dict[str, Any]:
    """A fused qkv weight cannot tell the heads; q/k-norm weights can."""
    return {} if config.qk_norm else {"num_heads": config.num_heads}


def _rows(kernel: np.ndarray) -> np.ndarray:
    """Our (D, heads, head_dim) kernel → torch (heads·head_dim, D) rows."""
    return np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)


def _attention_out(tensors: dict, flat: dict, ours: str, theirs: str, fused: dict) -> None:
    for name, parts in fused.items():
        tensors[f"{theirs}.{name}.weight"] = np.concatenate(
            [_rows(flat[f"{ours}/{p}/kernel"]) for p in parts]
        )
        if f"{ours}/query/bias" in flat:
            tensors[f"{theirs}.{name}.bias"] = np.concatenate(
                [flat[f"{ours}/{p}/bias"].reshape(-1) for p in parts]
            )
    out = flat[f"{ours}/out/kernel"]
    tensors[f"{theirs}.proj.weight"] = _linear(out.reshape(-1, out.shape[-1]))
    tensors[f"{theirs}.proj.bias"] = flat[f"{ours}/out/bias"]
    for norm, name in (("q_norm", "query_norm"), ("k_norm", "key_norm")):
        if f"{ours}/{name}/scale" in flat:
            tensors[f"{theirs}.{norm}.weight"] = flat[f"{ours}/{name}/scale"]
            tensors[f"{theirs}.{norm}.bias"] = flat[f"{ours}/{name}/bias"]


def from_ours(flat: dict[str, np.ndarray], config: ViTConfig) -> dict[str, np.ndarray]:
    flat = layout.with_learned_posemb(flat, config, prefix_rows=False)  # no_embed_class
    tensors: dict[str, np.ndarray] = {}

    def norm(theirs: str, ours: str) -> None:
        tensors[f"{theirs}.weight"], tensors[f"{theirs}.bias"] = (
            flat[f"{ours}/scale"],
            flat[f"{ours}/bias"],
        )

    def dense(theirs: str, ours: str) -> None:
        tensors[f"{theirs}.weight"] = _linear(flat[f"{ours}/kernel"])
        if f"{ours}/bias" in flat:
            tensors[f"{theirs}.bias"] = flat[f"{ours}/bias"]

    tensors["patch_embed.proj.weight"] = np.ascontiguousarray(
        flat["embedding/kernel"].transpose(3, 2, 0, 1)
    )
    tensors["patch_embed.proj.bias"] = flat["embedding/bias"]
    if config.is_hybrid:
        tensors.update(timm_hybrid.from_ours(flat, config))
    for ours, theirs in (
        ("cls", "cls_token"),
        ("dist", "dist_token"),
        ("registers", "reg_token"),
        (layout.POSEMB, "pos_embed"),
    ):
        if ours in flat:
            tensors[theirs] = flat[ours]
    for i in range(config.num_layers):
        ours, theirs = layout.BLOCK.format(i), f"blocks.{i}"
        norm(f"{theirs}.norm1", f"{ours}/LayerNorm_0")
        _attention_out(
            tensors,
            flat,
            layout.ATTN.format(i),
            f"{theirs}.attn",
            {"qkv": ("query", "key", "value")},
        )
        norm(f"{theirs}.norm2", f"{ours}/LayerNorm_2")
        dense(f"{theirs}.mlp.fc1", f"{ours}/MlpBlock_3/Dense_0")
        dense(f"{theirs}.mlp.fc2", f"{ours}/MlpBlock_3/Dense_1")
        if config.layerscale_init is not None:
            tensors[f"{theirs}.ls1.gamma"] = flat[f"{ours}/layerscale_attn"]
            tensors[f"{theirs}.ls2.gamma"] = flat[f"{ours}/layerscale_mlp"]
    if config.pool == "map":
        tensors["attn_pool.latent"] = flat["MAPHead_0/probe"]
        fused = {"q": ("query",), "kv": ("key", "value")}
        _attention_out(
            tensors, flat, "MAPHead_0/MultiHeadDotProductAttention_0", "attn_pool", fused
        )
        norm("attn_pool.norm", "MAPHead_0/LayerNorm_0")
        dense("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0")
        dense("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")
    if config.fc_norm:
        norm("fc_norm", "fc_norm")
    else:
        norm("norm", "Transformer/encoder_norm")
    if config.num_classes:
        dense("head", "head")
        if config.distillation_token:
            dense("head_dist", "head_dist")
    return tensors


# ---------------------------------------------------------------------------------------------
# Writing: weights + timm's config.json, and the call that builds the model.


def files(
    path: str, tensors: dict[str, np.ndarray], config: ViTConfig, embedded: str
) -> dict[str, bytes]:
    """A folder (timm's hub layout) when `path` has no file suffix, else the file + `<stem>.config.json`."""
    from safetensors.numpy import save as safetensors_bytes

    pre = input_convention.Preprocessing.from_dict(json.loads(embedded)["preprocessing"])
    weights = safetensors_bytes(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        # torch ignores the metadata; transformers refuses files without 'format'.
        metadata={"format": "pt", "vit_jax": embedded},
    )
    hub = json.dumps(hub_config(config, pre), indent=2) + "\n"
    return dict(zip(outputs(path), [weights, hub.encode()], strict=True))


def outputs(path: str) -> list[str]:
    """[weights, timm config.json]: in the folder `path`, or `path` and `<stem>.config.json`."""
    if _is_folder(path):
        return [f"{path.rstrip('/')}/{WEIGHTS_FILE}", f"{path.rstrip('/')}/{CONFIG_FILE}"]
    return [path, os.path.splitext(path)[0] + ".config.json"]


def _is_folder(path: str) -> bool:
    return not os.path.splitext(os.path.basename(path.rstrip("/")))[1]


def how_to_load(path: str, config: ViTConfig) -> str:
    """The exact timm calls that build this model and load the weights strictly."""
    weights = f"{path.rstrip('/')}/{WEIGHTS_FILE}" if _is_folder(path) else path
    args = ", ".join(f"{k}={v!r}" for k, v in model_args(config).items())
    if config.is_hybrid and timm_hybrid.architecture(config) is None:
        # No registered timm name has this backbone: build the model as timm's hybrids do.
        lines = timm_hybrid.construction(config) + [
            "import timm",
            f"model = VisionTransformer(embed_layer=partial(HybridEmbed, backbone=backbone), {args})",
            f"timm.models.load_checkpoint(model, {weights!r})",
        ]
    else:
        lines = [
            "import timm",
            f"model = timm.create_model({architecture(config)!r}, pretrained=False, {args})",
            f"timm.models.load_checkpoint(model, {weights!r})",
        ]
    lines += [f"# not expressible in timm's config: {x}" for x in not_in_hub_config(config)]
    return "\n".join(lines)
