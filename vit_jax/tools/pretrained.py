"""`python -m vit_jax.tools.pretrained [MODEL] [--urls]`: the public checkpoints one can load by name.

Prints `vit_jax.list_pretrained()` (`vit_jax.interop.pretrained.TABLE`) as an aligned table: model,
name, resolution, classes and the ImageNet-1k top-1 that a primary source states for that file.
"""

from __future__ import annotations

from vit_jax.interop import pretrained
from vit_jax.tools import cli

_COLUMNS = ("model", "pretrained", "image_size", "num_classes", "top1", "data")


def format_listing(entries: list[dict]) -> str:
    """`list_pretrained()`'s entries as an aligned text table (top-1 in % as its source states it, "-" where none does)."""
    cell = lambda e, c: "-" if e[c] is None else f"{e[c]:g}" if c == "top1" else str(e[c])  # noqa: E731
    widths = {c: max([len(c), *(len(cell(e, c)) for e in entries)]) for c in _COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in _COLUMNS).rstrip()]
    lines += ["  ".join(cell(e, c).ljust(widths[c]) for c in _COLUMNS).rstrip() for e in entries]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m vit_jax.tools.pretrained",
        description="List the public checkpoints that load_pretrained(MODEL, pretrained=NAME) "
        "fetches by name, with their ImageNet-1k top-1 (%) where a primary source states it.",
    )
    parser.add_argument("model", nargs="?", help="only this model, e.g. ViT-B/16 or B/16")
    parser.add_argument("--urls", action="store_true", help="also print each file's URL")
    args = parser.parse_args(argv)

    def run() -> int:
        entries = pretrained.list_pretrained(args.model)
        if not entries:
            models = sorted({e.model for e in pretrained.TABLE})
            raise ValueError(f"no public checkpoints of {args.model!r}; models with some: {models}")
        print(format_listing(entries))
        if args.urls:
            print("\n".join(f"{e['model']} {e['pretrained']}: {e['url']}" for e in entries))
        print("inputs: " + "; ".join(sorted({e["inputs"] for e in entries})))
        return 0

    return cli.run_guarded(run, args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
