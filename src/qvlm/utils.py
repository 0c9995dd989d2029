"""Small helpers shared across stages: the cache location, crash-safe folder and file writes."""

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
    the temporary folder, so a folder at `path` is always complete. (A SIGKILL cannot be cleaned up
    after: its `.NAME.tmp-*` folder stays until the next save; see checkpoint.remove_leftovers.) The
    result has the modes the umask gives, not mkdtemp's 0700 and safetensors' 0600, so that another
    account (a service user serving the model) can read it when the umask allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _follow_umask(tmp)
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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _follow_umask(root: Path) -> None:
    """chmod `root` and everything in it to what a plain mkdir/open would have made under the umask."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def _umask() -> int:
    """The process umask. Read from /proc where it exists: setting it to read it back is racy in threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_device(name: str):
    """`name` as a `torch.device` this torch can use, or a `QVLMError` that says what to do instead
    (torch itself fails later, mid-load, with a bare AssertionError for CUDA on a CPU-only build)."""
    import torch

    from qvlm.errors import QVLMError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise QVLMError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU or driver"
            raise QVLMError(f"--device {name}: CUDA is not available (torch {torch.__version__}: {build}); "
                            "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QVLMError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise QVLMError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device
