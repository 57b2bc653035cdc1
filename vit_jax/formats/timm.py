"""timm `VisionTransformer` state dicts ⇄ our layout, and timm's own model names and config.json.

Torch layouts: a Linear stores (out, in), so our kernels are its transpose; the patch conv is OIHW (ours
HWIO); attention input projections are fused into one `qkv` Linear (3·D, D) whose rows are [q; k; v],
each (heads, head_dim) flattened. The fused weight does not tell the number of heads: it comes from the
caller (`num_heads`, or a variant such as 'ViT-B/16' or a timm name such as 'deit_tiny_patch16_224'),
from a timm config.json (`model_args`), or from the q/k-norm weights (head_dim,) when the model has them.

Representable: class token or none, registers (`reg_token`), learned posemb covering the prefix tokens
or not (`no_embed_class`), fixed sin-cos posemb (written as the learned `pos_embed` table it equals,
timm has no sin-cos), no posemb, qk-norm, LayerScale (`ls1`/`ls2`), token/avg/MAP (`attn_pool`) pooling,
`fc_norm`, qkv bias or none, exact or tanh GELU (`act_layer='gelu_tanh'`). Not representable
(ValueError): a pre-logits layer (timm's VisionTransformer has none).
Not in the tensors (`convert.reload_overrides` lists them): heads (unless qk-norm), GELU flavour and
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

from vit_jax import preprocessing
from vit_jax.formats import layout
from vit_jax.formats.source import Source
from vit_jax.model_config import WIDTHS, ViTConfig

NAME = "timm"
SOURCE_DEFAULTS = ViTConfig(gelu_approximate=False, layernorm_epsilon=1e-6)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# timm's width names (facts from timm's model registry: vision_transformer.py, deit.py):
# name → (embed_dim, depth, num_heads, mlp_dim).
_TIMM_WIDTHS = {
    "tiny": WIDTHS["Ti"],
    "small": WIDTHS["S"],
    "medium": WIDTHS["M"],
    "base": WIDTHS["B"],
    "large": WIDTHS["L"],
    "so400m": WIDTHS["So400m"],
    "huge": WIDTHS["H"],
    "giant": WIDTHS["g"],
    "gigantic": WIDTHS["G"],
    "mediumd": dict(hidden_size=512, mlp_dim=2048, num_heads=8, num_layers=20),
    "betwixt": dict(hidden_size=640, mlp_dim=2560, num_heads=10, num_layers=12),
    "wee": dict(hidden_size=256, mlp_dim=1280, num_heads=4, num_layers=14),  # mlp_ratio 5
    "little": dict(hidden_size=320, mlp_dim=1792, num_heads=5, num_layers=14),  # mlp_ratio 5.6
    "so150m": dict(hidden_size=896, mlp_dim=2304, num_heads=14, num_layers=18),  # mlp_ratio 2.572
    "giantopt": dict(hidden_size=1536, mlp_dim=6144, num_heads=16, num_layers=40),
}
_FAMILIES = ("vit", "deit", "deit3")
# SigLIP 2 image towers use tanh GELU (timm `act_layer='gelu_tanh'`); SigLIP 1 ones exact GELU.
_TANH_GELU = re.compile(
    r"^vit_(base_patch32_siglip|so400m_patch16_siglip|large_patch16_siglip(_gap)?_512|giantopt_)"
)
_UNSUPPORTED = ("distilled", "clip", "xp", "rope", "18x2", "pwee", "dwee", "dpwee", "dlittle")


def _tokens(name: str) -> list[str]:
    return name.removeprefix("timm/").removeprefix("hf-hub:timm/").split(".")[0].split("_")


def parse_timm_name(name: str) -> dict[str, Any] | None:
    """A timm model name → the config fields it implies, or None if it is no timm ViT name.

    'vit_base_patch16_224.augreg_in21k' → width/depth/heads/patch/size; the families' own options too:
    `deit3_*` (LayerScale, posemb without class row), `*_reg4*` (registers), `*_gap*` (mean pooling,
    no class token), `*_siglip*` (MAP pooling, no class token; tanh GELU for SigLIP 2 sizes),
    `*_dinov2`, `vit_betwixt/wee/little/medium(d)_*_reg*` (LayerScale).
    """
    if not isinstance(name, str):
        return None
    tokens = _tokens(name)
    patches = [int(t[5:]) for t in tokens if re.fullmatch(r"patch\d+", t)]
    if (
        len(tokens) < 3
        or tokens[0] not in _FAMILIES
        or tokens[1] not in _TIMM_WIDTHS
        or not patches
    ):
        return None
    unsupported = [t for t in tokens if t in _UNSUPPORTED]
    if unsupported or tokens[1] == "giant" and "dinov2" in tokens:
        raise ValueError(
            f"timm model {name!r}: its {unsupported or ['SwiGLU MLP']} variant has layers this "
            f"model does not have (allowed: plain, reg, gap, map, siglip, dinov2, deit, deit3 names)"
        )
    fields: dict[str, Any] = dict(_TIMM_WIDTHS[tokens[1]], patch_size=(patches[0], patches[0]))
    sizes = [int(t) for t in tokens[2:] if t.isdigit()]
    if sizes:
        fields["image_size"] = sizes[0]
    registers = [int(t[3:]) for t in tokens if re.fullmatch(r"reg\d+", t)]
    if registers:
        fields.update(num_registers=registers[0], posemb_covers_prefix=False)
    if tokens[0] == "deit3":
        fields.update(layerscale_init=1e-6, posemb_covers_prefix=False)
    elif "dinov2" in tokens or (
        registers and tokens[1] in ("betwixt", "wee", "little", "medium", "mediumd")
    ):
        fields["layerscale_init"] = 1e-5
    if "siglip" in tokens:
        fields.update(class_token=False, pool="gap" if "gap" in tokens else "map")
        fields["fc_norm"] = False
        fields["gelu_approximate"] = bool(_TANH_GELU.match("_".join(tokens)))
    elif "gap" in tokens:
        fields.update(class_token=False, pool="gap", fc_norm=True)  # timm: avg pooling → fc_norm
    elif "map" in tokens:
        fields.update(class_token=False, pool="map")
    return fields


def name_preprocessing(name: str) -> preprocessing.Preprocessing | None:
    """The input convention a timm name's weights expect (DeiT and DINOv2: ImageNet mean/std)."""
    tokens = _tokens(name) if isinstance(name, str) else []
    if tokens and (tokens[0] in ("deit", "deit3") or "dinov2" in tokens):
        return preprocessing.IMAGENET
    return None


_POOLS = {"token": "token", "avg": "gap", "map": "map", "": "none"}
_ACT = {"gelu": False, "gelu_tanh": True}


def hub_config_hints(hub: dict[str, Any]) -> dict[str, Any]:
    """A timm config.json ('architecture', 'model_args') → config fields."""
    hints = parse_timm_name(hub.get("architecture", "")) or {}
    args = hub.get("model_args", {})
    renames = dict(
        num_heads="num_heads",
        img_size="image_size",
        in_chans="num_channels",
        embed_dim="hidden_size",
        depth="num_layers",
        qkv_bias="qkv_bias",
        qk_norm="qk_norm",
        class_token="class_token",
        reg_tokens="num_registers",
        fc_norm="fc_norm",
    )
    hints.update({ours: args[theirs] for theirs, ours in renames.items() if theirs in args})
    if "no_embed_class" in args:
        hints["posemb_covers_prefix"] = not args["no_embed_class"]
    if args.get("global_pool") in _POOLS:
        hints["pool"] = _POOLS[args["global_pool"]]
    if args.get("init_values") is not None:
        hints["layerscale_init"] = args["init_values"]
    act = args.get("act_layer")
    if act is not None:
        if act not in _ACT:
            raise ValueError(f"timm config act_layer={act!r}: allowed {sorted(_ACT)}")
        hints["gelu_approximate"] = _ACT[act]
    if args.get("pos_embed") == "none":
        hints["posemb"] = "none"
    return hints


def hub_preprocessing(hub: dict[str, Any]) -> preprocessing.Preprocessing | None:
    """mean/std of a timm config.json (`pretrained_cfg`, or top level in older files)."""
    cfg = hub.get("pretrained_cfg") or hub
    if "mean" not in cfg or "std" not in cfg:
        return name_preprocessing(hub.get("architecture", ""))
    method = cfg.get("interpolation", "bilinear")
    return preprocessing.Preprocessing(
        mean=cfg["mean"],
        std=cfg["std"],
        resize=method if method in preprocessing.RESIZE_METHODS else "bilinear",
    )


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
    for theirs, ours in (
        ("cls_token", "cls"),
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
    if "head.weight" in state:
        dense("head", "head")
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
    for ours, theirs in (
        ("cls", "cls_token"),
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
    return tensors


# ---------------------------------------------------------------------------------------------
# timm's config.json and the call that builds the model.


def architecture(config: ViTConfig) -> str:
    """A registered timm name of the same width (`model_args` override all of its settings)."""
    for width in ("tiny", "small", "base", "large", "huge"):
        if _TIMM_WIDTHS[width]["hidden_size"] == config.hidden_size:
            return f"vit_{width}_patch16_224"
    return "vit_base_patch16_224"


def model_args(config: ViTConfig) -> dict[str, Any]:
    """timm `VisionTransformer` keyword arguments that build exactly `config`'s model."""
    square = lambda pair: pair[0] if pair[0] == pair[1] else list(pair)  # noqa: E731
    pools = {v: k for k, v in _POOLS.items()}
    args = dict(
        img_size=square(config.image_size),
        patch_size=square(config.patch_size),
        in_chans=config.num_channels,
        num_classes=config.num_classes,
        global_pool=pools[config.pool],
        embed_dim=config.hidden_size,
        depth=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_dim / config.hidden_size,
        qkv_bias=config.qkv_bias,
        qk_norm=config.qk_norm,
        init_values=config.layerscale_init,
        class_token=config.has_class_token,
        reg_tokens=config.num_registers,
        # A sin-cos table is written as pos_embed without class/register rows.
        no_embed_class=not config.posemb_covers_prefix or config.posemb == "sincos2d",
        fc_norm=config.fc_norm,
    )
    if config.posemb == "none":
        args["pos_embed"] = "none"
    if config.gelu_approximate:
        args["act_layer"] = "gelu_tanh"
    return args


def hub_config(config: ViTConfig, pre: preprocessing.Preprocessing) -> dict[str, Any]:
    """timm's config.json: what `timm.create_model` reads from a hub folder."""
    args = model_args(config)
    return {
        "architecture": architecture(config),
        "num_classes": config.num_classes,
        "num_features": config.hidden_size,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [config.num_channels, *config.image_size],
            "interpolation": pre.resize,
            "crop_pct": 1.0,  # resized whole, as evaluation here does
            "mean": list(pre.mean),
            "std": list(pre.std),
            "num_classes": config.num_classes,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def not_in_hub_config(config: ViTConfig) -> list[str]:
    """What timm's config.json cannot say (norm_layer is a callable there)."""
    if config.layernorm_epsilon != 1e-6:
        return [f"layernorm_epsilon={config.layernorm_epsilon} (timm builds LayerNorm eps=1e-6)"]
    return []


def files(
    path: str, tensors: dict[str, np.ndarray], config: ViTConfig, embedded: str
) -> dict[str, bytes]:
    """A folder (timm's hub layout) when `path` has no file suffix, else the file + `<stem>.config.json`."""
    from safetensors.numpy import save as safetensors_bytes

    pre = preprocessing.Preprocessing.from_dict(json.loads(embedded)["preprocessing"])
    weights = safetensors_bytes(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()},
        # torch ignores the metadata; transformers refuses files without 'format'.
        metadata={"format": "pt", "vit_jax": embedded},
    )
    hub = json.dumps(hub_config(config, pre), indent=2) + "\n"
    if _is_folder(path):
        return {f"{path}/{WEIGHTS_FILE}": weights, f"{path}/{CONFIG_FILE}": hub.encode()}
    return {path: weights, os.path.splitext(path)[0] + ".config.json": hub.encode()}


def _is_folder(path: str) -> bool:
    return not os.path.splitext(os.path.basename(path.rstrip("/")))[1]


def how_to_load(path: str, config: ViTConfig) -> str:
    """The exact timm calls that build this model and load the weights strictly."""
    weights = f"{path.rstrip('/')}/{WEIGHTS_FILE}" if _is_folder(path) else path
    args = ", ".join(f"{k}={v!r}" for k, v in model_args(config).items())
    lines = [
        "import timm",
        f"model = timm.create_model({architecture(config)!r}, pretrained=False, {args})",
        f"timm.models.load_checkpoint(model, {weights!r})",
    ]
    lines += [f"# not expressible in timm's config: {x}" for x in not_in_hub_config(config)]
    return "\n".join(lines)
