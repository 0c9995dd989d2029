"""What the commands print: qvlm's own progress bars, and the libraries' chatter kept out of the way.

Every long step shows one tqdm bar with a rate and an ETA. On a terminal it redraws in place; when
stderr is a file or a pipe (a log), each update becomes one whole line, so no two updates run together.
The libraries' own bars and advice ("Loading weights", "Writing model shards", the torchvision
fallback, deprecation warnings) are hidden unless `qvlm --verbose`.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from tqdm.auto import tqdm

# Where library warnings come from (FutureWarning / UserWarning are raised inside these packages).
LIBRARY_MODULES = r"(transformers|peft|accelerate|torch|huggingface_hub|tokenizers)(\.|$)"
LOG_INTERVAL_S = 30.0  # in a log file, at most one progress line per bar every this many seconds


class _LineWriter:
    """A tqdm file for logs: each in-place redraw ("\\r" + status) becomes one line; repeats dropped."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs: Any) -> tqdm:
    """A tqdm bar for one long qvlm step (kwargs as tqdm's: total, desc, unit, initial, disable, ...)."""
    stream = kwargs.pop("file", None) or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    # ascii: a log viewer may not show the block characters; refresh rarely: a log is read afterwards
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, file=_LineWriter(stream), ascii=True, **kwargs)


def quiet_libraries(verbose: bool = False) -> None:
    """Hide the libraries' progress bars, advisory logging and deprecation warnings (not errors).

    With `verbose`, restore transformers' defaults instead (it keeps one global state per process).
    Warning filters are added to the current ones: call inside `warnings.catch_warnings()`.
    """
    from transformers.utils import logging as hf_logging  # lazy: a second or so to import

    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=LIBRARY_MODULES)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def warn(message: str) -> None:
    """A qvlm warning the user should act on: always shown (not subject to warning filters)."""
    print(f"qvlm: WARNING: {message}", file=sys.stderr, flush=True)
