"""Translations between this project's parameter layout and other libraries' checkpoint layouts.

Only these modules know other libraries' parameter names. Each registered format is one module with
the same interface, and `vit_jax.interop.load` / `.save` only ever loop over `REGISTRY`:

  NAME                          the name users pass (`save_pretrained(format=...)`, `--to`)
  detect(source) -> bool        is this local file/folder (`source.Source`) in this format?
  read(source, hints)           → `layout.Converted` (our flat layout + what the files say)
  to_ours(tensors, hints, side) → `layout.Converted`, from tensors (+ the side config, e.g. HF's)
  from_ours(flat, config)       → the format's tensors, from our flat loop layout
  unrepresentable(config)       → what of `config` the format cannot hold ([] when it can)
  side_config(config)           → what `to_ours` needs beside the tensors (HF config) or None
  required_hints(config)        → what loading the tensors alone must be told (timm: num_heads)
  SUFFIXES                      the destination suffixes it writes ('': a folder); a suffix another
                                format writes is refused (`save.check_destination`), others pass
  outputs(path)                 → the paths `files` writes for `path` (checked before any is written)
  files(path, tensors, config, embedded) → {path: bytes} to write (`embedded`: our JSON description)
  how_to_load(path, config)     → the lines that load it in its own library

Adding a format: one module with these functions, plus one line in `REGISTRY`.
`tests/test_formats.py` checks that every registered format round-trips or says why not.

  vit_jax_npz  published google-research/vision_transformer `.npz` (also what we write as 'npz');
               big_vision `.npz` files are read through it (`big_vision.py`: renames only)
  timm         timm `VisionTransformer` state dicts and hub folders (`timm_config.py`: timm's model
               names and config.json; `timm_hybrid.py`: the hybrids' ResNetV2 backbone names)
  hf           Hugging Face `ViTModel` / `ViTForImageClassification` folders
  layout.py    our flat layout and config inference from shapes; source.py reading files
"""

from vit_jax.interop.formats import hf, timm, vit_jax_npz

# Detection tries these in order; the first whose `detect` says yes reads the checkpoint.
REGISTRY = {module.NAME: module for module in (vit_jax_npz, hf, timm)}
