"""`python -m vit_jax.tools.convert SRC DST --to npz|timm|hf|onnx|savedmodel|tflite|stablehlo` (also
`vit-convert`): one checkpoint read by `vit_jax.interop.load.load_checkpoint` and written by
`vit_jax.interop.save.save_pretrained` (weights) or `vit_jax.interop.deploy.export` (a file that runs
in another runtime; `--with_preprocessing`, `--quantize dynamic_int8`, `--batch`, `--input_size`).

The destination is checked before the source is read (a long download is not wasted on a name that
would be refused), and the report ends with what a reader that ignores our metadata must be told
(`set_flags`: `--set` flags a shell passes through unchanged). `--weights ema|raw` picks which
weights of a training run are written (default: its EMA when it kept one, else the raw weights;
`vit_jax.interop.load` says why).
"""

from __future__ import annotations

import shlex
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from vit_jax import progress
from vit_jax.interop import deploy, load, save
from vit_jax.interop.formats import REGISTRY
from vit_jax.tools import cli
from vit_jax.tools.cli import parse_value


def set_flags(settings: dict[str, Any]) -> str:
    """`--set FIELD=VALUE ...` that a shell passes through unchanged and `parse_value` reads back."""
    shown = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    # A bare word reads back as itself (gap, sincos2d); anything else as its Python literal.
    text = lambda v: v if isinstance(v, str) and parse_value(v) == v else repr(v)  # noqa: E731
    return " ".join(f"--set {shlex.quote(f'{k}={text(v)}')}" for k, v in shown.items())


def _weights_note(loaded) -> str:
    """', from the EMA weights' / ', from the raw weights' for a training run; '' otherwise."""
    return {"ema": ", from the EMA weights", "raw": ", from the raw weights"}.get(
        loaded.weights, ""
    )


def _deploy(args, overrides: dict[str, Any], input_size) -> int:
    """The deployment half of `main`: read, trace, write, say how to run it."""
    with logging_redirect_tqdm(), progress.bar(2, f"export to {args.to}", unit="stage") as stages:
        loaded = load.load_checkpoint(
            args.src, variant=args.variant, weights=args.weights, **overrides
        )
        stages.update(1)
        deploy.save_pretrained(
            loaded.params, args.dst, format=args.to, model=loaded.config,
            preprocessing=loaded.preprocessing, overwrite=args.overwrite,
            with_preprocessing=args.with_preprocessing, quantize=args.quantize, batch=args.batch,
            input_size=input_size,
        )  # fmt: skip
        stages.update(1)
    runtime = deploy.REGISTRY[args.to].RUNTIME
    takes = "uint8 pixels" if args.with_preprocessing else loaded.preprocessing.describe()
    print(f"wrote {args.dst} ({args.to}) of a model with {loaded.config}{_weights_note(loaded)}")
    print(f"inputs: {takes}; the input convention is stored in the file")
    print(f"runs with {runtime}: python -m vit_jax.tools.predict --checkpoint {args.dst} IMAGE")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.convert",
        description="Convert a ViT checkpoint (vit_jax/big_vision .npz, timm, HF, Orbax) to "
        f"{', '.join(deploy.FORMATS)}.",
    )
    parser.add_argument("src", help="checkpoint file or folder (local, gs:// or http(s)://)")
    parser.add_argument("dst", help="output file (npz, timm) or folder (hf; timm without suffix)")
    parser.add_argument("--to", required=True, choices=sorted(deploy.FORMATS), help="output format")
    parser.add_argument(
        "--with_preprocessing",
        action="store_true",
        help="deployment formats: bake polarity, resize and normalization into the graph, so the "
        "file takes uint8 (batch, H, W, C) pixels",
    )
    parser.add_argument(
        "--input_size",
        default=None,
        help="with --with_preprocessing: a fixed H,W for the uint8 input (default: images of any "
        "size, in every deployment format)",
    )
    parser.add_argument(
        "--quantize", choices=deploy.common.QUANTIZATIONS, help="tflite: dynamic-range int8 weights"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="a static batch size (tflite: default 1)"
    )
    parser.add_argument("--variant", help="e.g. ViT-B/16 or vit_base_patch16_224")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default=None,
        help="a training run's weights: its EMA (kept with config.ema_decay > 0) or the raw ones; default: the EMA when the checkpoint has one, else raw",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ViTConfig override, e.g. --set num_heads=12 --set image_size=384 (repeatable)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing destination file, or write into a folder that is not empty "
        "(without it, an existing destination is refused and nothing is written)",
    )
    args = parser.parse_args(argv)
    cli.plain_warnings()
    overrides = cli.parse_overrides(parser, args.set)
    cli.quiet_logs(args.verbose, tensorflow=False)

    deploying = args.to in deploy.REGISTRY
    given = [f"--{n}" for n in ("with_preprocessing", "input_size", "quantize", "batch")]
    given = [f for f in given if getattr(args, f[2:]) not in (None, False)]
    if given and not deploying:
        parser.error(f"{', '.join(given)}: only for --to {', '.join(deploy.REGISTRY)}")
    input_size = None
    if args.input_size is not None:
        value = cli.parse_value(args.input_size)
        input_size = (value, value) if isinstance(value, int) else value
        if not (isinstance(input_size, tuple) and len(input_size) == 2):
            parser.error(f"--input_size {args.input_size!r}: expected H,W (e.g. 224,224)")

    def run() -> int:
        # Before a long download or read: a destination we may not write is known now.
        deploy.check_destination(args.dst, args.to, args.overwrite)
        if deploying:
            return _deploy(args, overrides, input_size)
        # One bar over the stages (reading + translating, writing, checking what a reader needs);
        # a download of a remote source has its own bar in bytes. Warnings print above the bar.
        with (
            logging_redirect_tqdm(),
            progress.bar(3, f"convert to {args.to}", unit="stage", leave=True) as stages,
        ):
            loaded = load.load_checkpoint(
                args.src, variant=args.variant, weights=args.weights, **overrides
            )
            stages.update(1)
            save.save_pretrained(
                loaded.params, args.dst, format=args.to, model=loaded.config,
                preprocessing=loaded.preprocessing, overwrite=args.overwrite,
            )  # fmt: skip
            stages.update(1)
            needed = save.reload_overrides(loaded.params, loaded.config, args.to)
            stages.update(1)
        config = loaded.config
        print(f"wrote {args.dst} ({args.to}) of a model with {config}{_weights_note(loaded)}")
        print(
            f"inputs: {loaded.preprocessing.describe()}; config and inputs are stored in the file"
        )
        how = REGISTRY[args.to].how_to_load(args.dst, config).replace("\n", "\n  ")
        print("load it with:\n  " + how)
        if needed:
            print(
                f"a reader that ignores our metadata must be told: {set_flags(needed)} "
                f"(vit_jax.load_pretrained needs nothing)"
            )
        return 0

    return cli.run_guarded(run, args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
