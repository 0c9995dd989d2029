"""Optional dependencies: which `pip install 'qvlm[EXTRA]'` brings each one (pyproject.toml's extras).

A plain `pip install qvlm` trains and runs models; serving, caption metrics, the offline bundle, the
demo data, report figures and Hugging Face datasets folders each need an extra. Code imports these
packages where it uses them; the CLI turns the ImportError into one line naming the extra.
"""

from __future__ import annotations

import importlib.util

from qvlm.errors import QVLMError

# import name -> the extra that installs it
EXTRA_OF = {
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "httpx": "serve",
    "pycocoevalcap": "eval",
    "gguf": "bundle", "onnx": "bundle",
    "easy_vqa": "demo",
    "matplotlib": "report",
    "datasets": "datasets",
}


class MissingExtra(QVLMError):
    """An optional package is not installed; the message names the extra to install."""


def missing_extra(error: ImportError, needed_for: str = "this command",
                  extra: str | None = None) -> MissingExtra | None:
    """The clear error for `error` when it is about an optional package; None when it is not (a bug).

    `extra` names it when the ImportError does not (a library that re-raises with a message only).
    """
    package = (error.name or "").partition(".")[0]
    extra = extra or EXTRA_OF.get(package)
    if extra is None:
        return None
    missing = f"the optional package `{package}`" if package else "an optional package"
    return MissingExtra(f"{needed_for} needs {missing}, which is not installed: "
                        f"pip install 'qvlm[{extra}]' (or 'qvlm[all]')")


def require(package: str, needed_for: str) -> None:
    """Raise the clear error now if `package` is missing (before slow work that would need it later)."""
    if importlib.util.find_spec(package) is None:
        raise missing_extra(ModuleNotFoundError(name=package), needed_for)
