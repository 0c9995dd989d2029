"""Exceptions that mean "the user's input or environment is wrong": the CLI prints them as one line."""

from __future__ import annotations

from qvlm.config import ConfigError
from qvlm.hub import ModelLoadError


class QVLMError(RuntimeError):
    """Base for qvlm's own user-facing errors (bad run folder, empty dataset, failed fetch, ...)."""


USER_ERRORS = (ConfigError, ModelLoadError, QVLMError, FileNotFoundError)
