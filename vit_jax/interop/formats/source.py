"""A checkpoint on local disk, probed once: what every format's `detect` and `read` look at.

Reading bytes is shared by all formats (an .npz, a safetensors file, a torch pickle, a folder with a
`config.json`); what the tensors *mean* is each format module's business. Files that this project
wrote carry our own description of the model (`EMBEDDED_KEY`: the full `ViTConfig` and the
preprocessing), in a place the other libraries ignore: the zip comment of an .npz, the `__metadata__`
of a safetensors header, a key of an HF `config.json`.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from typing import Any

import numpy as np

EMBEDDED_KEY = "vit_jax"  # {"config": ViTConfig.to_dict(), "preprocessing": {...}}
NOT_A_CHECKPOINT = (
    "is not a checkpoint: expected an .npz (vit_jax, big_vision), a safetensors file or torch "
    "pickle (timm; HF with config.json beside it), a Hugging Face or timm folder with config.json, "
    "or a vit_jax Orbax checkpoint directory"
)


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
    raise ValueError(f"{path} {NOT_A_CHECKPOINT} (it starts with {head[:8]!r})")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e


def safetensors_metadata(path: str) -> dict[str, str]:
    """The header's `__metadata__` (str → str), without reading the tensors."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return header.get("__metadata__") or {}


def read_torch(path: str) -> dict[str, np.ndarray]:
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


def _folder_weights(folder: str) -> str | list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):  # Sharded: every shard the index names.
        with open(index) as f:
            return [
                os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))
            ]
    for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
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


class Source:
    """A local checkpoint file or folder; its parts are read on first use and kept."""

    def __init__(self, path: str):
        self.path = path
        self.is_dir = os.path.isdir(path)
        if self.is_dir and not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"{path} {NOT_A_CHECKPOINT} (a folder without config.json)")
        self.kind = "folder" if self.is_dir else sniff(path)

    @functools.cached_property
    def config_json(self) -> dict[str, Any] | None:
        """The folder's config.json, or for a file the config.json beside it (HF weights)."""
        folder = self.path if self.is_dir else os.path.dirname(os.path.abspath(self.path))
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            return None
        with open(config_path) as f:
            return json.load(f)

    def sibling_json(self, name: str) -> dict[str, Any] | None:
        folder = self.path if self.is_dir else os.path.dirname(os.path.abspath(self.path))
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    @functools.cached_property
    def weights_path(self) -> str | list[str]:
        return _folder_weights(self.path) if self.is_dir else self.path

    @functools.cached_property
    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor, read now (so a truncated file fails here, not halfway through)."""
        weights = self.weights_path
        if isinstance(weights, list):
            return {k: v for shard in weights for k, v in read_safetensors(shard).items()}
        if self.kind == "npz":
            return read_npz(weights)
        kind = sniff(weights) if self.is_dir else self.kind
        return read_safetensors(weights) if kind == "safetensors" else read_torch(weights)

    @functools.cached_property
    def keys(self) -> list[str]:
        """Tensor names, from the header alone where the file allows it."""
        weights = self.weights_path
        if isinstance(weights, str) and (sniff(weights) if self.is_dir else self.kind) in (
            "safetensors",
        ):
            with open(weights, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
            return [k for k in header if k != "__metadata__"]
        return list(self.tensors)

    @functools.cached_property
    def embedded(self) -> dict[str, Any] | None:
        """Our own description of the model, when this project wrote the file."""
        text = None
        weights = self.weights_path
        if self.kind == "npz":
            with zipfile.ZipFile(self.path) as archive:
                text = archive.comment.decode(errors="replace") or None
        elif isinstance(weights, str) and (sniff(weights) if self.is_dir else self.kind) == (
            "safetensors"
        ):
            text = safetensors_metadata(weights).get(EMBEDDED_KEY)
        if text is None and self.is_dir:
            return (self.config_json or {}).get(EMBEDDED_KEY)
        try:
            value = json.loads(text) if text else None
        except json.JSONDecodeError:
            return None  # someone else's zip comment
        return value if isinstance(value, dict) and "config" in value else None


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an `.npz`, read now (so a truncated file fails here, not halfway through)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise ValueError(
            f"{path}: not a readable .npz checkpoint (truncated or corrupt?): {e}"
        ) from e
