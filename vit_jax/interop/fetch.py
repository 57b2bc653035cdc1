"""Where a checkpoint's bytes come from: the one way this project copies a remote file to disk.

  cache_root()           $VIT_JAX_CACHE, else ~/.cache/vit_jax: read when asked, never at import,
                         so a test or a user can point it elsewhere at any time
  localize(path)         a local path holding `path`'s content: a local path as it is; gs:// (and
                         any tf.io.gfile file system) and http(s) copied once into the cache
  download(url, local)   an https file into `local`, once: the file the by-name table fetches
                         (`pretrained.fetch`) and the http(s) copies of `localize`

Every copy is written to `<local>.partial` and renamed to `local` only when it is complete (and, for
`download`, verified), so an interrupted or refused copy never appears under the real name; the
`.partial` is removed whatever went wrong. A download waits at most `DOWNLOAD_TIMEOUT_S` for each
network operation, so an unreachable server is an error rather than a hang. A cached copy is used as
it is: `localize` has nothing to verify it against (the by-name table checks its files itself).

This project's own Orbax checkpoints are not localized: Orbax reads remote file systems itself, and
`load.load_checkpoint` recognizes them before it asks for a local copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable

from vit_jax import progress

DOWNLOAD_TIMEOUT_S = 60


def cache_root() -> str:
    """The folder downloads (and the JAX compilation cache) live under, as the environment says now."""
    return os.environ.get("VIT_JAX_CACHE", os.path.expanduser("~/.cache/vit_jax"))


def gfile():
    """tf.io.gfile: imported only for gs:// and the other remote file systems it reads."""
    import tensorflow as tf

    return tf.io.gfile


def cache_path(url: str) -> str:
    """Where `localize` keeps its copy of `url`: one folder per URL, the file under its own name."""
    name = os.path.basename(urllib.parse.urlparse(url).path.rstrip("/")) or "checkpoint"
    return os.path.join(cache_root(), hashlib.sha256(url.encode()).hexdigest()[:16], name)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _publish(local: str, write: Callable[[str], None]) -> str:
    """`write(partial)` fills `<local>.partial`; only once it returns is that renamed to `local`."""
    os.makedirs(os.path.dirname(local), exist_ok=True)
    partial = f"{local}.partial"
    try:
        write(partial)
        os.replace(partial, local)
    except BaseException:  # interrupted too: never leave a half copy behind
        _remove(partial)
        raise
    return local


def download(
    url: str,
    local: str,
    desc: str | None = None,
    total: int | None = None,
    verify: Callable[[str], None] | None = None,
) -> str:
    """`url` copied to `local` (returned), with a bar in bytes (`desc`; `total` when the server
    sends no length). `verify(partial)` may refuse the complete file by raising: it is then not kept.
    Raises what urllib raises (`urllib.error.URLError`, an OSError; a timeout after
    `DOWNLOAD_TIMEOUT_S` of silence)."""

    def write(partial: str) -> None:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            open(partial, "wb") as f,
        ):
            size = getattr(response, "length", None) or total
            progress.copy(response, f, size, desc or f"download {os.path.basename(local)}")
        if verify is not None:
            verify(partial)

    return _publish(local, write)


def _copy_remote(path: str, partial: str) -> None:
    g = gfile()
    if g.isdir(path):  # an HF folder: its files, not recursively
        os.makedirs(partial, exist_ok=True)
        for name in g.listdir(path):
            if not g.isdir(f"{path}/{name}"):
                g.copy(f"{path}/{name}", os.path.join(partial, name), overwrite=True)
    else:
        g.copy(path, partial, overwrite=True)


def localize(path: str) -> str:
    """A local path holding `path`'s content: `path` itself when local, else a copy made once into
    `cache_path(path)` (http(s) by `download`, anything else by tf.io.gfile; a remote folder's files,
    not its subfolders) and reused from then on."""
    path = os.fspath(path)
    if "://" not in path:
        return path
    local = cache_path(path)
    if os.path.exists(local):
        return local
    if path.startswith(("http://", "https://")):
        return download(path, local)
    return _publish(local, lambda partial: _copy_remote(path, partial))
