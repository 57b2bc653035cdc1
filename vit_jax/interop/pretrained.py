"""Public checkpoints by name: `load_pretrained('ViT-B/16', pretrained='augreg-i21k-ft-i1k')`.

    vit_jax.list_pretrained()            # what exists: model, name, data, input convention, top-1
    model, params = vit_jax.load_pretrained('ViT-B/16', pretrained='augreg-i21k-ft-i1k')

Each name resolves, through `TABLE` below, to a file in the public Google Cloud Storage buckets of
google-research/vision_transformer (`gs://vit_models/...`: the ViT paper's and AugReg's checkpoints)
and google-research/big_vision (`gs://big_vision/...`), read over https from
`https://storage.googleapis.com/<bucket>/<path>` (`VIT_JAX_PRETRAINED_URL` replaces that base, e.g. a
mirror). A file is downloaded once (`fetch.download`) into `$VIT_JAX_CACHE/pretrained/<bucket>/<path>`
(default `~/.cache/vit_jax`), under a temporary name until it is complete and verified, so a truncated
or corrupt download is never used (a corrupt cached copy is fetched again). Offline, the error says
which URL to fetch and where to put the file.

What "verified" means: the CRC-32 that the .npz (zip) archive stores for every array is checked, so a
truncated or damaged file is refused. The table records no size or sha256 for these files (it was
written without downloading them; the buckets publish no sha256), so a complete file that differs
from Google's is not detected; an entry given `size=` / `sha256=` (a mirror's own table, the
tests) is checked against those too.

Sources of the table: the AugReg file names are the ones timm's `vit_*.augreg_in21k(_ft_in1k)`
configs load, big_vision's `VANITY_NAMES` ("howto-i21k-*") and the fine-tuned checkpoints that the
google-research/vision_transformer README recommends ("Available ViT models"); big_vision's plain
ViT-S/16 ImageNet-1k baselines ("Better plain ViT baselines", arXiv 2205.01580) and the original
paper's ImageNet-21k checkpoints (`imagenet21k/ViT-*.npz`) are from the same buckets.

The hybrids (R50+ViT-B/16 of the paper, AugReg's R+ViT-Ti/16, R26+ViT-S/32, R50+ViT-L/32) are the
files timm's `vision_transformer_hybrid.py` configs load, with timm's top-1 for them.

`top1` is the ImageNet-1k validation top-1 (%) stated for that exact file, and `top1_source` says
by whom: the vision_transformer README for the files it recommends, big_vision for its baselines,
and for the fine-tuned files timm converted (`augreg-i21k-ft-i1k*`) timm's own evaluation of those
weights (`results/results-imagenet.csv`: bicubic resize, center crop 0.9 at 224 px, 1.0 at 384).
None where no source states one: ImageNet-21k checkpoints have no ImageNet-1k head, and no figure
for the 150-epoch ViT-S/16 baseline was found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import zipfile

from vit_jax.interop import fetch as fetch_lib
from vit_jax.interop.input_convention import DEFAULT, Preprocessing

DEFAULT_BASE_URL = "https://storage.googleapis.com"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One public checkpoint: where it is, what it was trained on, how to feed it."""

    model: str  # e.g. 'ViT-B/16': the first argument of load_pretrained
    name: str  # e.g. 'augreg-i21k-ft-i1k': its `pretrained=` argument
    path: str  # '<bucket>/<path in bucket>'
    data: str  # what it was trained (and fine-tuned) on
    num_classes: int
    image_size: int
    source: str
    top1: float | None = None  # ImageNet-1k top-1 (%) as `top1_source` states it
    top1_source: str | None = None
    preprocessing: Preprocessing = DEFAULT
    variant: str | None = None  # config fields the file does not say (default: `model`)
    sha256: str | None = None
    size: int | None = None

    @property
    def gs_url(self) -> str:
        return f"gs://{self.path}"

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get("VIT_JAX_PRETRAINED_URL") or DEFAULT_BASE_URL
        return f"{base.rstrip('/')}/{self.path}"


_AUGREG = "AugReg, 'How to train your ViT?' (arXiv 2106.10270)"
_AUGREG_FT = "imagenet2012-steps_20k"


_TIMM_RESULTS = (
    "timm's evaluation of these weights: huggingface/pytorch-image-models "
    "results/results-imagenet.csv (commit 0173a13), model vit_*.augreg_in21k_ft_in1k"
)


def _augreg(model: str, run: str, lr: str, top1: float, res: int = 224) -> Pretrained:
    """The AugReg fine-tune timm loads as `vit_*.augreg_in21k_ft_in1k`, with timm's top-1 for it."""
    stem = f"vit_models/augreg/{model.replace('/', '_')}-i21k-300ep-lr_0.001-{run}"
    suffix = "" if res == 224 else f"-{res}"
    return Pretrained(
        f"ViT-{model}", f"augreg-i21k-ft-i1k{suffix}",
        f"{stem}--{_AUGREG_FT}-lr_{lr}-res_{res}.npz",
        "ImageNet-21k, fine-tuned on ImageNet-1k", 1000, res, _AUGREG,
        top1=top1, top1_source=_TIMM_RESULTS,
    )  # fmt: skip


def _augreg_i21k(model: str, run: str) -> Pretrained:
    return Pretrained(
        f"ViT-{model}", "augreg-i21k",
        f"vit_models/augreg/{model.replace('/', '_')}-i21k-300ep-lr_0.001-{run}.npz",
        "ImageNet-21k", 21843, 224, _AUGREG,
    )  # fmt: skip


_README = (
    "google-research/vision_transformer README, 'Available ViT models' (recommended AugReg "
    "checkpoints, with their ImageNet accuracy)"
)


def _recommended(model: str, run: str, lr: str, top1: float) -> Pretrained:
    """A fine-tuned checkpoint the vision_transformer README recommends, with the ImageNet accuracy
    its table states for that file (fine-tuned at 384 from the `augreg-i21k` upstream run)."""
    return Pretrained(
        f"ViT-{model}", "augreg-i21k-ft-i1k-384-recommended",
        f"vit_models/augreg/{model.replace('/', '_')}-i21k-300ep-lr_0.001-{run}"
        f"--{_AUGREG_FT}-lr_{lr}-res_384.npz",
        "ImageNet-21k, fine-tuned on ImageNet-1k at 384", 1000, 384, _README,
        top1=top1, top1_source=_README,
    )  # fmt: skip


_PAPER = "ViT paper (arXiv 2010.11929), vit_models/imagenet21k"
_BASELINES = "big_vision 'Better plain ViT baselines' (arXiv 2205.01580)"
_BASELINE_TOP1 = {  # (top-1, who states it)
    90: (76.5, "big_vision configs/vit_s16_i1k.py docstring: 90 epochs 'reach 76.5%'"),
    150: (None, None),  # no stated figure found for 150 epochs
    300: (80.0, "arXiv 2205.01580 abstract: '300 epochs of training reach 80%'"),
}

_TIMM_HYBRID_RESULTS = (
    "timm's evaluation of these weights: huggingface/pytorch-image-models "
    "results/results-imagenet.csv (commit 0173a13), model {}"
)


def _hybrid(model: str, stem: str, run: str, lr: str, res: int, timm: str, top1: float):
    """An AugReg hybrid fine-tune (the file timm's `<timm>.augreg_in21k_ft_in1k` loads)."""
    suffix = "" if res == 224 else f"-{res}"
    return Pretrained(
        model, f"augreg-i21k-ft-i1k{suffix}",
        f"vit_models/augreg/{stem}-i21k-300ep-lr_0.001-{run}--{_AUGREG_FT}-lr_{lr}-res_{res}.npz",
        "ImageNet-21k, fine-tuned on ImageNet-1k", 1000, res, _AUGREG,
        top1=top1, top1_source=_TIMM_HYBRID_RESULTS.format(f"{timm}.augreg_in21k_ft_in1k"),
    )  # fmt: skip


def _hybrid_i21k(model: str, stem: str, run: str) -> Pretrained:
    return Pretrained(
        model, "augreg-i21k", f"vit_models/augreg/{stem}-i21k-300ep-lr_0.001-{run}.npz",
        "ImageNet-21k", 21843, 224, _AUGREG,
    )  # fmt: skip


# The paper's and AugReg's hybrids (ResNet stem + ViT; file names as timm's hybrid configs load them).
_HYBRIDS = [
    _hybrid("R+ViT-Ti/16", "R_Ti_16", "aug_none-wd_0.03-do_0.0-sd_0.0", "0.03", 224,
            "vit_tiny_r_s16_p8_224", 71.798),
    _hybrid("R+ViT-Ti/16", "R_Ti_16", "aug_none-wd_0.03-do_0.0-sd_0.0", "0.03", 384,
            "vit_tiny_r_s16_p8_384", 75.962),
    _hybrid("R26+ViT-S/32", "R26_S_32", "aug_light0-wd_0.03-do_0.1-sd_0.1", "0.03", 224,
            "vit_small_r26_s32_224", 81.864),
    _hybrid("R26+ViT-S/32", "R26_S_32", "aug_medium2-wd_0.03-do_0.0-sd_0.0", "0.03", 384,
            "vit_small_r26_s32_384", 84.048),
    _hybrid("R50+ViT-L/32", "R50_L_32", "aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01", 224,
            "vit_large_r50_s32_224", 84.422),
    _hybrid("R50+ViT-L/32", "R50_L_32", "aug_medium2-wd_0.1-do_0.0-sd_0.0", "0.01", 384,
            "vit_large_r50_s32_384", 86.182),
    _hybrid_i21k("R+ViT-Ti/16", "R_Ti_16", "aug_none-wd_0.03-do_0.0-sd_0.0"),
    _hybrid_i21k("R26+ViT-S/32", "R26_S_32", "aug_medium2-wd_0.03-do_0.0-sd_0.0"),
    _hybrid_i21k("R50+ViT-L/32", "R50_L_32", "aug_medium2-wd_0.1-do_0.0-sd_0.0"),
    Pretrained(
        "R50+ViT-B/16", "i21k", "vit_models/imagenet21k/R50+ViT-B_16.npz", "ImageNet-21k",
        21843, 224, _PAPER,
    ),
    Pretrained(
        "R50+ViT-B/16", "i21k-ft-i1k-384", "vit_models/imagenet21k+imagenet2012/R50+ViT-B_16.npz",
        "ImageNet-21k, fine-tuned on ImageNet-1k at 384", 1000, 384, _PAPER,
        top1=84.976,
        top1_source=_TIMM_HYBRID_RESULTS.format("vit_base_r50_s16_384.orig_in21k_ft_in1k")
        + " (timm's port of this file)",
    ),
]  # fmt: skip

TABLE: list[Pretrained] = [
    *_HYBRIDS,
    # top1: timm's results-imagenet.csv "top1" column for the timm model that loads each file.
    _augreg("Ti/16", "aug_none-wd_0.03-do_0.0-sd_0.0", "0.03", 75.454),
    _augreg("S/32", "aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03", 75.994),
    _augreg("S/16", "aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03", 81.384),
    _augreg("B/32", "aug_medium1-wd_0.03-do_0.0-sd_0.0", "0.03", 80.716),
    _augreg("B/16", "aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01", 84.532),
    _augreg("B/16", "aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01", 85.996, res=384),
    _augreg("B/8", "aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01", 85.798),
    _augreg("L/16", "aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01", 85.834),
    _augreg("L/16", "aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01", 87.084, res=384),
    # top1: the README table's "Imagenet accuracy" column for each fine-tuned file, verbatim.
    _recommended("Ti/16", "aug_none-wd_0.03-do_0.0-sd_0.0", "0.03", 78.22),
    _recommended("S/32", "aug_none-wd_0.1-do_0.0-sd_0.0", "0.01", 79.58),
    _recommended("S/16", "aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03", 83.73),
    _recommended("B/32", "aug_light1-wd_0.1-do_0.0-sd_0.0", "0.01", 83.59),
    _recommended("B/16", "aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.03", 85.49),
    _recommended("L/16", "aug_strong1-wd_0.1-do_0.0-sd_0.0", "0.01", 85.59),
    _augreg_i21k("Ti/16", "aug_none-wd_0.03-do_0.0-sd_0.0"),
    _augreg_i21k("S/32", "aug_none-wd_0.1-do_0.0-sd_0.0"),
    _augreg_i21k("S/16", "aug_light1-wd_0.03-do_0.0-sd_0.0"),
    _augreg_i21k("B/32", "aug_light1-wd_0.1-do_0.0-sd_0.0"),
    _augreg_i21k("B/16", "aug_medium1-wd_0.1-do_0.0-sd_0.0"),
    _augreg_i21k("B/8", "aug_medium2-wd_0.1-do_0.0-sd_0.0"),
    _augreg_i21k("L/16", "aug_strong1-wd_0.1-do_0.0-sd_0.0"),
    *[
        Pretrained(
            f"ViT-{m}",
            "i21k",
            f"vit_models/imagenet21k/ViT-{m.replace('/', '_')}.npz",
            "ImageNet-21k",
            21843,
            224,
            _PAPER,
        )  # fmt: skip
        for m in ("B/16", "B/32", "L/16", "L/32", "H/14")
    ],
    *[
        Pretrained(
            "ViT-S/16",
            f"i1k-{epochs}ep",
            f"big_vision/vit_s16_i1k_{epochs}ep.npz",
            f"ImageNet-1k, {epochs} epochs (mean pooling, sin-cos posemb)",
            1000,
            224,
            _BASELINES,
            top1=top1,
            top1_source=top1_source,
        )  # fmt: skip
        for epochs, (top1, top1_source) in _BASELINE_TOP1.items()
    ],
]


def list_pretrained(model: str | None = None) -> list[dict]:
    """What `load_pretrained(model, pretrained=name)` can fetch: one dict per checkpoint."""
    return [
        dict(
            model=e.model,
            pretrained=e.name,
            data=e.data,
            image_size=e.image_size,
            num_classes=e.num_classes,
            inputs=e.preprocessing.describe(),
            top1=e.top1,
            top1_source=e.top1_source,
            url=e.url(),
            source=e.source,
        )
        for e in TABLE
        if model is None or _same_model(e.model, model)
    ]


def _same_model(a: str, b: str) -> bool:
    norm = lambda s: s.removeprefix("ViT-").replace("_", "/")  # noqa: E731
    return norm(a) == norm(b)


def find(model: str, name: str) -> Pretrained:
    """The table entry for (model, name); ValueError listing what exists otherwise."""
    for entry in TABLE:
        if _same_model(entry.model, model) and entry.name == name:
            return entry
    names = [e.name for e in TABLE if _same_model(e.model, model)]
    if not names:
        models = sorted({e.model for e in TABLE})
        raise ValueError(f"no public checkpoints of {model!r}; models with some: {models}")
    raise ValueError(f"pretrained={name!r} is not a public checkpoint of {model}; allowed: {names}")


def cache_path(entry: Pretrained) -> str:
    """Where `fetch` keeps `entry`'s file: `<cache root>/pretrained/<bucket>/<path>`."""
    return os.path.join(fetch_lib.cache_root(), "pretrained", *entry.path.split("/"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str, entry: Pretrained) -> None:
    """ValueError unless `path` is the whole, uncorrupted file (size, sha256, every CRC)."""
    size = os.path.getsize(path)
    if entry.size is not None and size != entry.size:
        raise ValueError(f"{path}: {size} bytes, expected {entry.size} (incomplete download?)")
    if entry.sha256 is not None and _sha256(path) != entry.sha256:
        raise ValueError(f"{path}: sha256 differs from the published {entry.sha256}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a complete .npz archive ({e})") from e
    if bad is not None:
        raise ValueError(f"{path}: array {bad!r} fails its CRC check (corrupt download)")


def fetch(entry: Pretrained, base_url: str | None = None) -> str:
    """The local path of `entry`'s file: from the cache, else downloaded once and verified."""
    local = cache_path(entry)
    if os.path.exists(local):
        try:
            verify(local, entry)
            return local
        except ValueError:
            os.remove(local)  # a corrupt cached copy: fetch it again
    url = entry.url(base_url)
    try:  # a file that fails `verify` is removed and its ValueError passes through
        return fetch_lib.download(
            url,
            local,
            f"download {entry.model} {entry.name}",
            total=entry.size,
            verify=lambda partial: verify(partial, entry),
        )
    except (urllib.error.URLError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {entry.model} pretrained={entry.name!r} from {url} ({e}). "
            f"Offline? Fetch it on a machine with network access, e.g.\n"
            f"  curl -o {local} {entry.url()}\n  (or: gsutil cp {entry.gs_url} {local})\n"
            f"and put it at {local}; it is read from there from then on"
        ) from e


def variant_of(entry: Pretrained) -> str | None:
    """The config fields the file does not say (heads of a fused layout): its model's variant."""
    return entry.variant if entry.variant is not None else entry.model
