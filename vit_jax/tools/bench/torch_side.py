"""The comparison side: the same ViT in timm (or HF transformers), eager or `torch.compile`d.

Same variant, batch, resolution and mode as ours; bf16 runs use autocast over float32 parameters,
as our `dtype='bfloat16'` computes in bf16 over float32 parameters. The train step is SGD with
momentum 0.9 on softmax cross-entropy, as our benchmark's `--optimizer sgd`. GELU is what the
library uses (exact erf); our side of a comparison is built with the same GELU.
torch, timm and transformers are optional (`requirements-bench.txt`); `available(library)` says
why a side cannot run instead of failing.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from vit_jax.model.config import ViTConfig
from vit_jax.tools.bench.jax_side import MODES, Runner

LIBRARIES = ("timm", "timm_compile", "hf", "hf_compile")


def available(library: str) -> str | None:
    """None when `library` can run here, else the reason it cannot."""
    if library not in LIBRARIES:
        return f"unknown comparison {library!r}; allowed: {', '.join(LIBRARIES)}"
    needed = ["torch", "timm" if library.startswith("timm") else "transformers"]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install -r requirements-bench.txt)"
    return None


def _timm_model(config: ViTConfig):
    from timm.models.vision_transformer import VisionTransformer

    from vit_jax.interop.formats import timm_config

    if config.is_hybrid:  # the backbone comes with the registered name (vit_base_r50_s16_224, ...)
        import timm

        arch = timm_config.architecture(config)
        return timm.create_model(arch, pretrained=False, **timm_config.model_args(config))
    return VisionTransformer(**timm_config.model_args(config))  # exactly our model, as exports do


def _hf_model(config: ViTConfig):
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf_config = HFConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        image_size=config.image_size[0],
        patch_size=config.patch_size[0],
        num_channels=config.num_channels,
        num_labels=config.num_classes,
        hidden_act="gelu",
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(hf_config)


def build(
    library: str, config: ViTConfig, mode: str, batch_size: int, device: str | None = None
) -> Runner:
    reason = available(library)
    if reason:
        raise RuntimeError(reason)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    hf = library.startswith("hf")
    model = (_hf_model(config) if hf else _timm_model(config)).to(device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default GPU precision
        torch.backends.cudnn.allow_tf32 = True
    shape = (batch_size, config.num_channels, *config.image_size)
    images = torch.rand(shape, device=device) * 2 - 1  # random, as ours: never time zeros
    labels = torch.randint(0, max(config.num_classes, 1), (batch_size,), device=device)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)

    def forward(x):
        out = model(x)
        return out.logits if hf else out

    fn = torch.compile(forward) if library.endswith("_compile") else forward

    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def call():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_fn(fn(images).float(), labels)
            loss.backward()
            optimizer.step()
            return loss

    else:
        model.eval()

        def call():
            with (
                torch.inference_mode(),
                torch.autocast(device, autocast_dtype, enabled=autocast_dtype is not None),
            ):
                return fn(images)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    call()  # torch.compile compiles here; eager allocates
    sync()
    compile_s = time.perf_counter() - start
    peak: Any = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        call()
        sync()
        peak = int(torch.cuda.max_memory_allocated())

    def run(n: int) -> None:
        for _ in range(n):
            call()
        sync()

    return Runner(run, compile_s, None, peak)
