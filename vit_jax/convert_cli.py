"""`python -m vit_jax.convert SRC DST --to npz|timm|hf` (also `vit-convert`): the command line of
`vit_jax.convert`, which holds the library (`load_checkpoint`, `save_pretrained`, ...).

Imports the library only when it runs, so `vit_jax.convert` can re-export `main` and `set_flags`.
"""

from __future__ import annotations

import shlex
from typing import Any

from vit_jax import cli, progress
from vit_jax.cli import parse_value
from vit_jax.formats import REGISTRY


def set_flags(settings: dict[str, Any]) -> str:
    """`--set FIELD=VALUE ...` that a shell passes through unchanged and `parse_value` reads back."""
    shown = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    # A bare word reads back as itself (gap, sincos2d); anything else as its Python literal.
    text = lambda v: v if isinstance(v, str) and parse_value(v) == v else repr(v)  # noqa: E731
    return " ".join(f"--set {shlex.quote(f'{k}={text(v)}')}" for k, v in shown.items())


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.convert",
        description="Convert a ViT checkpoint (vit_jax/big_vision .npz, timm, HF, Orbax) to "
        f"{', '.join(REGISTRY)}.",
    )
    parser.add_argument("src", help="checkpoint file or folder (local, gs:// or http(s)://)")
    parser.add_argument("dst", help="output file (npz, timm) or folder (hf; timm without suffix)")
    parser.add_argument("--to", required=True, choices=sorted(REGISTRY), help="output format")
    parser.add_argument("--variant", help="e.g. ViT-B/16 or vit_base_patch16_224")
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
    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        overrides[field] = parse_value(value)
    cli.quiet_logs(args.verbose, tensorflow=False)

    def run() -> int:
        # One bar over the stages (reading + translating, writing, checking what a reader needs);
        # a download of a remote source has its own bar in bytes. Warnings print above the bar.
        from tqdm.contrib.logging import logging_redirect_tqdm

        from vit_jax import convert

        # Before a long download or read: a destination we may not write is known now.
        convert.check_destination(args.dst, args.to, args.overwrite)
        with (
            logging_redirect_tqdm(),
            progress.bar(3, f"convert to {args.to}", unit="stage", leave=True) as stages,
        ):
            loaded = convert.load_checkpoint(args.src, variant=args.variant, **overrides)
            stages.update(1)
            convert.save_pretrained(
                loaded.params, args.dst, format=args.to, model=loaded.config,
                preprocessing=loaded.preprocessing, overwrite=args.overwrite,
            )  # fmt: skip
            stages.update(1)
            needed = convert.reload_overrides(loaded.params, loaded.config, args.to)
            stages.update(1)
        config = loaded.config
        print(f"wrote {args.dst} ({args.to}) of a model with {config}")
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
