"""Checkpoints in and out: every public ViT layout → (model, params), and ours → npz / timm / HF.

  model, params = load_pretrained(path, variant=None, **overrides)
  config, params = load_params(path, variant=None, **overrides)
  save_pretrained(params, path, format='npz' | 'timm' | 'hf', model=model_or_config)
  python -m vit_jax.convert SRC DST --to npz|timm|hf [--variant V] [--set key=value ...]

The format is detected from the content, not the name: an `.npz` (published vit_jax, with or without
the `opt/target/` prefix, or big_vision), a safetensors file or torch pickle (timm state dict, or HF
weights beside a `config.json`), a folder (HF or timm hub folder with `config.json`, or this project's
Orbax checkpoints). Every hyperparameter the shapes determine is read off them (`formats.layout`);
the rest comes from `variant`/`overrides`, the HF config, or the source's defaults. Overrides that the
checkpoint cannot satisfy as it is — another `image_size` (posemb resampled) or `num_classes` (new head)
— go through `transfer.adapt_params`; anything else that does not fit raises one ValueError naming the
first parameter and both shapes, before any model is returned.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import struct
import sys
import urllib.parse
import urllib.request
import zipfile
from typing import Any

import jax
import numpy as np

from vit_jax import checkpoints, cli, transfer
from vit_jax.formats import hf, layout, timm, vit_jax_npz
from vit_jax.model_config import ViTConfig, parse_variant
from vit_jax.models import VisionTransformer

FORMATS = {"npz": vit_jax_npz, "timm": timm, "hf": hf}
CACHE_DIR = os.environ.get("VIT_JAX_CACHE", os.path.expanduser("~/.cache/vit_jax"))
_NOT_A_CHECKPOINT = (
    "is not a checkpoint: expected an .npz (vit_jax, big_vision), a safetensors file or torch "
    "pickle (timm; HF with config.json beside it), a Hugging Face or timm folder with config.json, "
    "or a vit_jax Orbax checkpoint directory"
)


# ---------------------------------------------------------------------------------------------
# Where the bytes are: local paths, gs:// (tf.io.gfile) and http(s) (urllib), cached locally.


def _gfile():
    import tensorflow as tf  # Only for gs:// and other remote file systems.

    return tf.io.gfile


def _cache_path(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path.rstrip("/")) or "checkpoint"
    return os.path.join(CACHE_DIR, hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _is_orbax(path: str) -> bool:
    """A vit_jax training checkpoint (workdir, checkpoints dir or step dir), local or remote."""
    if path.startswith(("http://", "https://")) or ("://" not in path and not os.path.isdir(path)):
        return False
    try:
        return checkpoints.is_checkpoint(path)
    except Exception:  # Cannot probe it (a remote file, no backend for the file system): not
        return False  # ours; reading it as a file then reports what is wrong.


def localize(path: str) -> str:
    """A local path holding `path`'s content (downloaded once into CACHE_DIR when remote)."""
    path = os.fspath(path)
    if "://" not in path or _is_orbax(path):
        return path  # Orbax reads remote file systems itself.
    local = _cache_path(path)
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = local + ".partial"
    if path.startswith(("http://", "https://")):
        with urllib.request.urlopen(path) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    elif _gfile().isdir(path):  # An HF folder: its files, not recursively.
        os.makedirs(partial, exist_ok=True)
        for name in _gfile().listdir(path):
            if not _gfile().isdir(f"{path}/{name}"):
                _gfile().copy(f"{path}/{name}", os.path.join(partial, name), overwrite=True)
    else:
        _gfile().copy(path, partial, overwrite=True)
    os.replace(partial, local)
    return local


# ---------------------------------------------------------------------------------------------
# Reading: sniff the content, read all tensors, translate to our layout.


def sniff(path: str) -> str:
    """'npz', 'safetensors' or 'torch' from a file's first bytes; ValueError for anything else."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = os.path.getsize(path)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: a zip archive that is truncated or corrupt ({e})") from e
        if any(name.endswith(".npy") for name in names):
            return "npz"
        if any(name.endswith("data.pkl") for name in names):
            return "torch"
    elif len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len + 8 > size:
            raise ValueError(
                f"{path}: a safetensors file that is truncated (header of {header_len} bytes)"
            )
        return "safetensors"
    elif head[:1] == b"\x80":  # A pickle (legacy torch.save).
        return "torch"
    raise ValueError(f"{path} {_NOT_A_CHECKPOINT} (it starts with {head[:8]!r})")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path} is a PyTorch pickle: reading it needs torch installed; or convert it to "
            f".safetensors, which needs no torch"
        ) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file.
        raise ValueError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}"
        ) from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: a torch pickle of {type(state).__name__}, not a state dict")
    return {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()
    }


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    return _read_safetensors(path) if sniff(path) == "safetensors" else _read_torch(path)


def _read_folder_weights(folder: str) -> dict[str, np.ndarray]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):  # Sharded: every shard the index names.
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for s in shards for k, v in _read_safetensors(os.path.join(folder, s)).items()}
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return _read_state_dict(os.path.join(folder, name))
    if os.path.isdir(os.path.join(folder, "checkpoints")) or os.path.exists(
        os.path.join(folder, "metrics.jsonl")
    ):  # a training workdir (config.json is the run's config): say so, not "HF folder"
        raise FileNotFoundError(
            f"{folder} is a training workdir without a complete checkpoint yet (no "
            f"{os.path.join(folder, 'checkpoints', '<step>')}); train until one is saved"
        )
    raise ValueError(
        f"{folder}: config.json but no model.safetensors / pytorch_model.bin beside it"
    )


def _translate(path: str, hints: dict[str, Any]) -> tuple[layout.Converted, ViTConfig]:
    """A local checkpoint → (our layout, the source's default config)."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise ValueError(f"{path} {_NOT_A_CHECKPOINT} (a folder without config.json)")
        with open(config_path) as f:
            folder_config = json.load(f)
        state = _read_folder_weights(path)
        if hf.looks_like(folder_config):
            return hf.to_ours(state, folder_config), hf.SOURCE_DEFAULTS
        if "architecture" in folder_config and timm.looks_like(state):  # a timm hub folder
            hub_hints = {**timm.hub_config_hints(folder_config), **hints}
            converted = timm.to_ours(state, hub_hints)
            converted.fields.update(hub_hints)  # what the folder says about the model
            return converted, timm.SOURCE_DEFAULTS
        raise ValueError(f"{config_path}: neither an HF ViT config nor a timm one")
    kind = sniff(path)
    if kind == "npz":
        return vit_jax_npz.to_ours(vit_jax_npz.read(path)), vit_jax_npz.SOURCE_DEFAULTS
    state = _read_state_dict(path)
    if timm.looks_like(state):
        return timm.to_ours(state, hints), timm.SOURCE_DEFAULTS
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings")) for k in state):
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
        if not os.path.exists(config_path):
            raise ValueError(f"{path}: Hugging Face ViT weights need their config.json beside them")
        with open(config_path) as f:
            return hf.to_ours(state, json.load(f)), hf.SOURCE_DEFAULTS
    first = next(iter(state), None)
    raise ValueError(f"{path}: a state dict of no known ViT layout (first key {first!r})")


def variant_fields(variant: str | ViTConfig | None) -> dict[str, Any]:
    """'ViT-B/16', a timm name ('vit_base_patch16_224') or a ViTConfig → the config fields it fixes."""
    if variant is None:
        return {}
    if isinstance(variant, ViTConfig):
        return variant.to_dict()
    try:
        return parse_variant(variant)
    except ValueError:
        named = timm.parse_timm_name(variant)
        if named is None:
            raise
        return named


def load_params(
    path: str, *, variant: str | ViTConfig | None = None, **overrides
) -> tuple[ViTConfig, dict]:
    """(config, params) of any supported checkpoint; see the module docstring."""
    hints = {**variant_fields(variant), **overrides}
    path = localize(path)
    translated = not _is_orbax(path)
    if not translated:  # ours: the config was saved beside the params
        source_config, params = checkpoints.read_model(path)
        origin, preferred = {}, {}
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    else:
        converted, defaults = _translate(path, hints)
        source_config = layout.infer_config(converted, hints, defaults)
        params, origin = transfer.unflatten(converted.params), converted.origin
        preferred = {"scan": True} if converted.fields.get("scan") else {}  # keep big_vision's scan
    config = source_config.replace(**{**preferred, **hints})
    if translated:
        config = layout.canonical(config)
    try:
        params = transfer.adapt_params(params, source_config, config)
    except transfer.ParamMismatchError as e:
        if e.key in origin and origin[e.key] != e.key:
            raise transfer.ParamMismatchError(
                f"{path}: {e} ({e.key!r} is {origin[e.key]!r} in the file)", e.key
            ) from None
        raise transfer.ParamMismatchError(f"{path}: {e}", e.key) from None
    return config, jax.tree.map(np.asarray, params)


def load_pretrained(
    path: str, *, variant: str | ViTConfig | None = None, **overrides
) -> tuple[VisionTransformer, dict]:
    """(model, params) ready for `model.apply({'params': params}, images)`; see the module docstring."""
    config, params = load_params(path, variant=variant, **overrides)
    return VisionTransformer(config), params


# ---------------------------------------------------------------------------------------------
# Writing.


def _host_flat(params: Any, config: ViTConfig) -> dict[str, np.ndarray]:
    """Params of `config`'s model → flat loop-layout numpy, checked against the model first."""
    if config.scan:
        from vit_jax.models import unstack_layers

        params = unstack_layers(params)
    flat = {k: np.asarray(v) for k, v in transfer.flatten(params).items()}
    transfer.check_fits(flat, transfer.expected_shapes(config.replace(scan=False)), what="params")
    return flat


def _write_bytes(data: bytes, path: str) -> None:
    if "://" in path:
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    partial = path + ".partial"  # never leave a half-written checkpoint under the real name
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def save_pretrained(
    params: Any, path: str, format: str = "npz", model: VisionTransformer | ViTConfig | None = None
) -> str:
    """Write `params` of `model` as `format`; returns `path`.

    'npz': the published vit_jax layout, one file. 'timm': a safetensors state dict for
    `timm.create_model(...).load_state_dict`, one file. 'hf': a folder with config.json and
    model.safetensors for `ViTForImageClassification.from_pretrained` (`ViTModel` when
    num_classes == 0). What each can represent, and what `load_pretrained` must be told again
    (`reload_overrides`), is in the docstrings of `vit_jax.formats.*`.
    """
    from safetensors.numpy import save as safetensors_bytes

    if format not in FORMATS:
        raise ValueError(f"format={format!r}: allowed {sorted(FORMATS)}")
    config = model.config if isinstance(model, VisionTransformer) else model
    if not isinstance(config, ViTConfig):
        raise ValueError("save_pretrained needs model= (a VisionTransformer or its ViTConfig)")
    writer = FORMATS[format]
    writer.check_representable(config)
    flat = _host_flat(params, config)
    if format == "npz":
        # numpy has no bfloat16 of its own, so an .npz could not say what the bytes are.
        flat = {
            k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in flat.items()
        }
        _write_bytes(vit_jax_npz.write(vit_jax_npz.from_ours(flat, config)), path)
        return path
    tensors = {k: np.ascontiguousarray(v) for k, v in writer.from_ours(flat, config).items()}
    # transformers refuses safetensors files without format metadata; torch ignores it.
    weights = safetensors_bytes(tensors, metadata={"format": "pt"})
    if format == "timm":
        _write_bytes(weights, path)
        return path
    if "://" in path:
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)
    config_json = json.dumps(hf.to_hf_config(config), indent=2, sort_keys=True) + "\n"
    _write_bytes(weights, f"{path}/{hf.WEIGHTS_FILE}")
    _write_bytes(config_json.encode(), f"{path}/{hf.CONFIG_FILE}")
    return path


def reload_overrides(params: Any, config: ViTConfig, format: str) -> dict[str, Any]:
    """The overrides `load_pretrained` needs to rebuild exactly `config` from a `format` file.

    Computed by translating the tensors that would be written back to our layout and inferring the
    config from them, as loading does, without touching the disk.
    """
    writer = FORMATS[format]
    tensors = writer.from_ours(_host_flat(params, config), config)
    hints = {}
    if format == "timm" and not config.qk_norm:
        hints["num_heads"] = config.num_heads  # a fused qkv weight cannot tell
    if format == "npz":
        converted, defaults = vit_jax_npz.to_ours(tensors), vit_jax_npz.SOURCE_DEFAULTS
    elif format == "timm":
        converted, defaults = timm.to_ours(tensors, hints), timm.SOURCE_DEFAULTS
    else:
        converted, defaults = hf.to_ours(tensors, hf.to_hf_config(config)), hf.SOURCE_DEFAULTS
    inferred = layout.canonical(layout.infer_config(converted, hints, defaults))
    wanted = config.to_dict()
    differ = {k: v for k, v in wanted.items() if inferred.to_dict()[k] != v}
    return {**hints, **differ}


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)  # 4, 1e-6, True, None, (384, 384)
    except (ValueError, SyntaxError):
        return text  # a bare string such as gap


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.convert",
        description="Convert a ViT checkpoint (vit_jax/big_vision .npz, timm, HF, Orbax) to "
        "npz, timm or hf.",
    )
    parser.add_argument("src", help="checkpoint file or folder (local, gs:// or http(s)://)")
    parser.add_argument("dst", help="output file (npz, timm) or folder (hf)")
    parser.add_argument("--to", required=True, choices=sorted(FORMATS), help="output format")
    parser.add_argument("--variant", help="e.g. ViT-B/16 or vit_base_patch16_224")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ViTConfig override, e.g. --set num_heads=12 --set image_size=384 (repeatable)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        overrides[field] = _parse_value(value)
    cli.quiet_logs(args.verbose, tensorflow=False)

    def run() -> int:
        config, params = load_params(args.src, variant=args.variant, **overrides)
        save_pretrained(params, args.dst, format=args.to, model=config)
        print(f"wrote {args.dst} ({args.to}) of a model with {config}")
        needed = reload_overrides(params, config, args.to)
        if needed:
            settings = " ".join(f"--set {field}={value!r}" for field, value in needed.items())
            print(f"{args.to} does not store these; give them again when loading: {settings}")
        return 0

    return cli.run_guarded(run, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
