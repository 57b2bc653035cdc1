r"""Every GPU figure of the README in one run, one JSON: ours (cuDNN flash attention and XLA
attention) against timm eager and timm + torch.compile, inference and train step, ViT-B/16,
ViT-L/16 and the hybrid R50+ViT-B/16 (beside timm's vit_base_r50_s16_224) at 224 px, bf16 compute over float32 parameters, with MFU at the card's bf16 peak.

  bash benchmarks/gpu.sh results.json                  # on the GPU machine (~5 minutes)
  python benchmarks/gpu.py --tiny --out /tmp/tiny.json # the same script on CPU, tiny model (tests)

After the comparison rows come probes for MFU, ours alone: batch 512, and the matmuls on cuBLAS
instead of XLA's Triton GEMMs (an XLA option for that compilation only, as
`python -m vit_jax.tools.benchmark --compiler_option NAME=VALUE` takes it); the JSON ends with
`best_mfu`, our best row per variant and mode with the spec that gave it. Before them, `stablehlo`:
a ViT-Ti/16 exported as serialized StableHLO (lowered for CPU and CUDA), reloaded and run on this
machine's device, its logits against the JAX model's.

Robust by construction: each measurement runs in its own try, its error (or skip reason) is
recorded in the JSON, the JSON is rewritten after every measurement, and measurements that would
start after `--budget_s` are recorded as skipped instead of run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax.model.config import get_config  # noqa: E402
from vit_jax.tools import benchmark  # noqa: E402

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, image_size=32, num_classes=10)


def run_spec(variant, batch, mode, attention, compare=(), **compiler_options) -> dict:
    spec = dict(variant=variant, batch=batch, mode=mode, attention=attention, compare=list(compare))
    return {**spec, "compiler_options": compiler_options} if compiler_options else spec


def plan(tiny: bool) -> list[dict]:
    """What to measure, most important first: per variant and mode, ours with cuDNN attention
    beside timm eager and timm + torch.compile; then probes for MFU (ours alone: a larger batch,
    cuBLAS instead of Triton for the matmuls); then ours with XLA's attention alone."""
    torch_sides = ("timm", "timm_compile")
    if tiny:  # the same shape of plan on CPU; the probe's option is one CPU XLA knows
        return [
            *(
                run_spec("Ti/16", 4, m, a, torch_sides)
                for m in ("inference", "train")
                for a in ("auto", "xla")
            ),
            run_spec("Ti/16", 8, "inference", "xla"),
            run_spec("Ti/16", 4, "inference", "xla", xla_cpu_enable_fast_math=False),
        ]
    sizes = (("B/16", 256), ("L/16", 128))
    modes = ("train", "inference")
    return [
        *(run_spec(v, b, m, "cudnn", torch_sides) for v, b in sizes for m in modes),
        # The paper's hybrid: its ResNet stem in bf16 beside timm's vit_base_r50_s16_224.
        *(run_spec("R50+ViT-B/16", 128, m, "cudnn", torch_sides) for m in modes),
        *(run_spec("B/16", 512, m, "cudnn") for m in modes),
        *(run_spec("B/16", 256, m, "cudnn", xla_gpu_enable_triton_gemm=False) for m in modes),
        *(run_spec(v, b, m, "xla") for v, b in sizes for m in modes),
    ]


def best_mfu(runs: list[dict]) -> dict[str, dict]:
    """Per variant and mode, our row with the highest MFU and the spec that gave it."""
    best: dict[str, dict] = {}
    for entry in runs:
        for row in entry.get("report", {}).get("results", []):
            if row["library"] != "vit_jax" or not row.get("mfu"):
                continue
            key = f"{entry['spec']['variant']} {row['mode']}"
            if key not in best or row["mfu"] > best[key]["mfu"]:
                best[key] = {
                    "mfu": row["mfu"],
                    "images_per_s": row["images_per_s"],
                    **entry["spec"],
                }
    return best


def select(runs: list[dict], args) -> list[dict]:
    keep = []
    for spec in runs:
        if args.variants and spec["variant"] not in args.variants:
            continue
        if args.attention and spec["attention"] not in args.attention:
            continue
        keep.append({**spec, "compare": [] if args.no_compare else spec["compare"]})
    return keep


def attention_parity(variant: str, attention: str, reference: str = "xla") -> dict:
    """Logits and gradients of `attention` against `reference`: ‖diff‖ / ‖reference‖,
    bf16 compute, random params and images (the fast path must compute the same function)."""
    import jax
    import jax.numpy as jnp

    from vit_jax.model import vit

    out = {}
    images = jax.random.uniform(jax.random.key(1), (4, 224, 224, 3), jnp.float32, -1, 1)
    results = {}
    for impl in (attention, reference):
        model = vit.create_model(variant, dtype="bfloat16", attention_impl=impl)
        params = vit.init_params(model, jax.random.key(0))
        params = jax.tree.map(
            lambda x: x + 0.02 * jax.random.normal(jax.random.key(2), x.shape), params
        )

        def loss(p, model=model):
            return jnp.sum(jnp.sin(model.apply({"params": p}, images, train=True)))

        logits = jax.jit(lambda p, model=model: model.apply({"params": p}, images))(params)
        results[impl] = (logits, jax.jit(jax.grad(loss))(params))
    (fast_logits, fast_grads), (ref_logits, ref_grads) = results[attention], results[reference]

    def rel(a, b):  # ‖a − b‖ / ‖b‖ (per-element maxima mislead: the key bias's gradient is 0)
        return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))

    out["logits_rel_err"] = rel(fast_logits, ref_logits)
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    out["grads_rel_err"] = rel(flat(fast_grads), flat(ref_grads))
    return out


def stablehlo_on_this_device(variant: str, tiny: bool) -> dict:
    """A serialized StableHLO file (lowered for CPU and CUDA by `vit_jax.interop.deploy`) reloaded
    and run on this machine's default device, against the JAX model: issue 21's GPU check."""
    import tempfile

    import jax
    import numpy as np

    from vit_jax.interop import deploy
    from vit_jax.model import vit

    config = get_config(variant, **(TINY if tiny else dict(image_size=224)))
    model = vit.VisionTransformer(config)
    params = vit.init_params(model, jax.random.key(0))
    images = np.asarray(jax.random.uniform(jax.random.key(1), (3, *config.image_size, 3)) * 2 - 1)
    expected = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.stablehlo")
        deploy.save_pretrained(params, path, format="stablehlo", model=config)
        logits = np.asarray(deploy.load(path)(images))
    return {
        "variant": variant,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "max_abs_diff": float(np.abs(logits - expected).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU test of the script)")
    parser.add_argument("--budget_s", type=float, default=300.0, help="start no run after this")
    parser.add_argument("--variants", nargs="*", help="only these variants, e.g. B/16")
    parser.add_argument("--attention", nargs="*", help="only these attention_impl values")
    parser.add_argument("--no_compare", action="store_true", help="ours only, no torch side")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax

    started = time.perf_counter()
    report: dict = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "runs": [],
    }
    try:
        import torch

        report["torch_version"] = torch.__version__
    except ImportError:
        report["torch_version"] = None

    def write():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if report["backend"] == "gpu" and not args.no_compare:
        try:
            report["parity_cudnn_vs_xla"] = attention_parity("B/16", "cudnn")
            print("parity cudnn vs xla:", report["parity_cudnn_vs_xla"], file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            report["parity_cudnn_vs_xla"] = {"error": f"{type(e).__name__}: {e}"}
        write()
    try:  # the deployed StableHLO file runs on this device (CUDA on the GPU machine)
        report["stablehlo"] = stablehlo_on_this_device("Ti/16", args.tiny)
        print("stablehlo:", report["stablehlo"], file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - recorded; the other runs still happen
        report["stablehlo"] = {"error": f"{type(e).__name__}: {e}"}
    write()
    for spec in select(plan(args.tiny), args):
        entry = {"spec": spec}
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            entry["skipped"] = f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"
        else:
            try:
                overrides = dict(TINY) if args.tiny else dict(image_size=224)
                dtype = "float32" if args.tiny else "bfloat16"
                config = get_config(
                    spec["variant"],
                    **overrides,
                    dtype=dtype,
                    attention_impl=spec["attention"],
                    gelu_approximate=False,  # timm's GELU: both sides compute the same function
                )
                start = time.perf_counter()
                entry["report"] = benchmark.compare(
                    config,
                    modes=(spec["mode"],),
                    batch_size=spec["batch"],
                    steps=args.steps,
                    repeats=args.repeats,
                    libraries=tuple(spec["compare"]),
                    compiler_options=spec.get("compiler_options"),
                )
                entry["wall_s"] = time.perf_counter() - start
                print(benchmark.format_table(entry["report"]), file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 - recorded; the other runs still happen
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc()[-3000:]
                print(f"FAILED {spec}: {entry['error']}", file=sys.stderr, flush=True)
        report["runs"].append(entry)
        write()
    report["best_mfu"] = best_mfu(report["runs"])
    print("best MFU per variant and mode:", json.dumps(report["best_mfu"]), file=sys.stderr)
    report["total_s"] = time.perf_counter() - started
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
