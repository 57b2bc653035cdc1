"""Is a checkpoint what was saved, and can the storage take one: fingerprints and storage errors.

Fingerprint: per array, a position-weighted sum of its raw bits (each 8/16/32-bit word times an
odd weight, modulo 2**32), computed on the devices where the array lives (sharded arrays are not
gathered anywhere). Changing any single word changes the sum (an odd weight is invertible modulo
2**32), so garbled bytes that a file format would load silently are caught on restore.

Storage: `check_writable` probes a directory with a tiny file (read-only file systems and missing
permissions fail in milliseconds, not at Orbax's barrier timeout); `storage_cause` turns the
errors a save can end in (ENOSPC, EROFS, EACCES, tensorstore's RESOURCE_EXHAUSTED) into a phrase;
`write_whole` writes a local file so that it is never seen half-written.

Numerics: `numerics_fingerprint` records what a run's numbers depend on besides its config (jax,
jaxlib and XLA versions, backend, device kind and count, the CPU's vector instruction sets, core
count, XLA_FLAGS and thread settings); each checkpoint stores it and a resume on another one is
warned about (`numerics_differences`), since XLA compiles for the machine it runs on and results
then differ in the last digits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


class FingerprintMismatchError(ValueError):
    """A restored array differs from what was saved."""


def _word_sum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    itemsize = np.dtype(x.dtype).itemsize
    words = jax.lax.bitcast_convert_type(x, _UNSIGNED[itemsize]).astype(jnp.uint32)
    if itemsize == 8:  # (x64 only) two 32-bit words per element: fold them into one
        words = words[..., 0] ^ (words[..., 1] * jnp.uint32(0x9E3779B1))
    # Linear index of every element, from per-axis iotas (no reshape: sharded arrays stay put).
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(
            stride % 2**32
        )
        stride *= words.shape[axis]
    weights = index * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


def make_fingerprint():
    """A function: tree of arrays → {'path/to/leaf': 'hex fingerprint'} (jitted once per shape)."""
    sums = jax.jit(lambda tree: jax.tree.map(_word_sum, tree))

    def fingerprint(tree: Any) -> dict[str, str]:
        values = jax.device_get(sums(tree))
        flat = jax.tree_util.tree_flatten_with_path(values)[0]
        return {jax.tree_util.keystr(path): f"{int(v):08x}" for path, v in flat}

    return fingerprint


def verify(actual: dict[str, str], recorded: dict[str, str]) -> None:
    """Raises FingerprintMismatchError naming the first arrays that differ."""
    if not recorded:
        raise FingerprintMismatchError("no fingerprint recorded")
    differ = sorted(k for k in set(actual) | set(recorded) if actual.get(k) != recorded.get(k))
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise FingerprintMismatchError(f"fingerprint mismatch in {shown}")


def short_reason(error: BaseException) -> str:
    """The first line of an error, shortened: enough to say what is wrong with a step."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------
# Storage.

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "file too large for the file system or its limits",
}
_TEXT_CAUSES = (
    ("RESOURCE_EXHAUSTED", "no space left on the device"),
    ("No space left", "no space left on the device"),
    ("Read-only file system", "the file system is read-only"),
    ("Permission denied", "permission denied"),
    ("PERMISSION_DENIED", "permission denied"),
    ("File too large", "file too large for the file system or its limits"),
)


def storage_cause(error: BaseException) -> str:
    """A phrase for why a write failed, looking through chained exceptions."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _CAUSES:
            return _CAUSES[seen.errno]
        for needle, cause in _TEXT_CAUSES:
            if needle in str(seen):
                return cause
        seen = seen.__cause__ or seen.__context__
    return short_reason(error)


def write_whole(path: str, data: bytes) -> None:
    """Writes `data` to the local file `path` through `<path>.partial` and a rename: a crash, a
    full disk or Ctrl-C leaves the previous file (or none), never half of one, and no `.partial`."""
    partial = path + ".partial"
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


def check_writable(directory: str | epath.Path) -> None:
    """Raises OSError (naming `directory` and the cause) unless a file can be created in it.

    A directory that does not exist yet is judged by its nearest existing parent (it would be
    created there). Remote paths (gs://) are left to the writer.
    """
    path = str(directory)
    if "://" in path:
        return
    probe_dir = path
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise NotADirectoryError(f"{path}: {probe_dir} is not a directory")
    probe = os.path.join(probe_dir, f".write-probe-{uuid.uuid4().hex}")
    try:
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"{path} is not writable: {storage_cause(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


# ---------------------------------------------------------------------------------------------
# Numerics fingerprint.

# The CPU instruction sets LLVM may vectorize XLA's CPU code with (the flags of /proc/cpuinfo):
# another set is another compiled program, e.g. other fused-multiply-add or reduction widths.
# (jax exposes no XLA CPU target features; this is what the host says it has.)
_ISA_FLAG = re.compile(r"(sse\d\w*|ssse3|avx\w*|fma\w*|f16c|amx\w*)$")
_THREAD_VARIABLES = ("XLA_FLAGS", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


def _cpu_info() -> tuple[str, list[str]]:
    """(model name, sorted vector-ISA flags) of this host's CPU ('' and [] where unknown)."""
    model, flags = platform.processor(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86 / ARM
                flags = {flag for flag in value.split() if _ISA_FLAG.match(flag)}
    return model, sorted(flags)


def numerics_fingerprint() -> dict[str, Any]:
    """What this process's compiled numbers depend on besides the config (JSON-serializable)."""
    import jaxlib
    from jax.extend import backend as jax_backend

    devices = jax.devices()
    cpu_model, cpu_flags = _cpu_info()
    try:
        from jax._src import lib as jax_lib  # XLA's own revision; not public, hence guarded

        xla = str(jax_lib.jaxlib_extension_version)
    except (ImportError, AttributeError):
        xla = "unknown"
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_extension": xla,
        "backend": jax.default_backend(),
        "platform_version": jax_backend.get_backend().platform_version,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_model": cpu_model,
        "cpu_features": " ".join(cpu_flags),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        **{name: os.environ.get(name, "") for name in _THREAD_VARIABLES},
    }


def numerics_differences(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """'name: saved → current' for each entry that differs (CPU features: which are on one side
    only) ([] when `saved` is None: a checkpoint
    written before fingerprints existed says nothing)."""
    if not saved:
        return []
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old == new:
            continue
        if name == "cpu_features" and isinstance(old, str) and isinstance(new, str):
            gone = sorted(set(old.split()) - set(new.split()))
            added = sorted(set(new.split()) - set(old.split()))
            parts = [f"{' '.join(gone)} at save time only"] if gone else []
            parts += [f"{' '.join(added)} here only"] if added else []
            out.append(f"cpu_features: {', '.join(parts)}")
        else:
            out.append(f"{name}: {old!r} → {new!r}")
    return out
