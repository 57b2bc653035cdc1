"""`python -m vit_jax.tools.convert SRC DST --to npz|timm|hf` (also `vit-convert`): one checkpoint read
by `vit_jax.interop.load.load_checkpoint` and written by `vit_jax.interop.save.save_pretrained`.

The destination is checked before the source is read (a long download is not wasted on a name that
would be refused), and the report ends with what a reader that ignores our metadata must be told
(`set_flags`: `--set` flags a shell passes through unchanged).
"""

from __future__ import annotations

import shlex
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from vit_jax import progress
from vit_jax.interop import load, save
from vit_jax.interop.formats import REGISTRY
from vit_jax.tools import cli
from vit_jax.tools.cli import parse_value


def set_flags(settings: dict[str, Any]) -> str:
    """`--set FIELD=VALUE ...` that a shell passes through unchanged and `parse_value` reads back."""
    shown = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    # A bare word reads back as itself (gap, sincos2d); anything else as its Python literal.
    text = lambda v: v if isinstance(v, str) and parse_value(v) == v else repr(v)  # noqa: E731
    return " ".join(f"--set {shlex.quote(f'{k}={text(v)}')}" for k, v in shown.items())


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 1 with one `FATAL` line (2 for a usage mistake); see vit_jax.tools.cli."""
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.convert",
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
        # Before a long download or read: a destination we may not write is known now.
        save.check_destination(args.dst, args.to, args.overwrite)
        # One bar over the stages (reading + translating, writing, checking what a reader needs);
        # a download of a remote source has its own bar in bytes. Warnings print above the bar.
        with (
            logging_redirect_tqdm(),
            progress.bar(3, f"convert to {args.to}", unit="stage", leave=True) as stages,
        ):
            loaded = load.load_checkpoint(args.src, variant=args.variant, **overrides)
            stages.update(1)
            save.save_pretrained(
                loaded.params, args.dst, format=args.to, model=loaded.config,
                preprocessing=loaded.preprocessing, overwrite=args.overwrite,
            )  # fmt: skip
            stages.update(1)
            needed = save.reload_overrides(loaded.params, loaded.config, args.to)
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


if __name__ == "__main__":
    raise SystemExit(main())
