"""What `python -m vit_jax.tools.benchmark` prints and writes: the tables, and the `--json_out` file.

`check_json_out(path)` runs before anything is built or timed: a path that could not be written at
the end (a directory, a parent that is a file, a read-only place) fails in milliseconds instead of
after the whole run. It creates nothing: `write_json` creates a missing parent folder (as a missing
--workdir is created) only once the report exists, and replaces the file whole, so a failed run
leaves what was there before.
"""

from __future__ import annotations

import os
from typing import Any


def format_table(report: dict[str, Any]) -> str:
    header = (
        f"{'mode':<10} {'library':<13} {'img/s':>9} {'vs ours':>8} {'step ms':>9} "
        f"{'compile s':>9} {'GFLOP/img':>9} {'peak MB':>8} {'MFU':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in report["results"]:
        ratio = r.get("vit_jax_speedup")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(
            f"{r['mode']:<10} {r['library']:<13} {r['images_per_s']:>9.1f} "
            f"{(f'{ratio:.2f}x' if ratio else '-'):>8} {1000 * r['median_step_s']:>9.1f} "
            f"{r['compile_s']:>9.1f} {r.get('xla_gflops_per_image') or 0:>9.2f} "
            f"{(r['peak_memory_mb'] or 0):>8.0f} "
            f"{mfu:>6}"
        )
    for e in report["errors"]:
        lines.append(f"{e['mode']:<10} {e['library']:<13} {e.get('skipped') or e.get('error')}")
    lines.append("'vs ours': our images/s over this row's (above 1: vit_jax is faster).")
    return "\n".join(lines)


def format_trainer_table(report: dict[str, Any]) -> str:
    bare, ours = report["bare_step"]["images_per_s"], report["trainer"]["images_per_s"]
    return "\n".join(
        [
            f"bare jitted step loop   {bare:>9.1f} img/s",
            f"train_and_evaluate      {ours:>9.1f} img/s  ({100 * ours / bare:.0f}% of the bare loop; "
            f"{report['trainer']['wall_s']:.0f} s wall for {report['steps']} steps incl. compile)",
        ]
    )


def check_json_out(path: str | None) -> None:
    """Raises ValueError naming `path` unless the report can be written there at the end."""
    if not path:
        return
    if "://" in path:
        raise ValueError(
            f"--json_out={path} is invalid: a local file path is needed (copy the file to remote "
            "storage afterwards)"
        )
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(
            f"--json_out={path} is a directory: give a file path, e.g. "
            f"{os.path.join(path, 'benchmark.json')}"
        )
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--json_out={path} cannot be written: the file is read-only")
    from vit_jax import integrity  # imports JAX: only when a path is given

    parent = os.path.dirname(os.path.abspath(path))
    try:
        integrity.check_writable(parent)  # a missing parent: judged by where it would be created
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"--json_out={path} cannot be written: {reason}") from None


def write_json(path: str, text: str) -> None:
    """`text` into `path` whole (`integrity.write_whole`), creating its parent folder if missing."""
    from vit_jax import integrity

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    integrity.write_whole(path, text.encode())
