"""Small helpers shared across stages: the cache location, crash-safe folder writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_home() -> Path:
    """Where qvlm keeps what it can rebuild: `$QVLM_CACHE`, default `~/.cache/qvlm`."""
    return Path(os.environ.get("QVLM_CACHE") or "~/.cache/qvlm").expanduser()


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    A crash, Ctrl-C or full disk mid-write leaves `path` as it was (old content or absent) and removes
    the temporary folder, so a folder at `path` is always complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

