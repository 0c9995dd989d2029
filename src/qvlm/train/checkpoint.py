"""Checkpoints that resume a run exactly, in safe formats only (safetensors + JSON, no pickle).

    RUN/checkpoints/step-000500/
        model/              the trainable weights, a loadable `QVLM.save_pretrained` folder
        optimizer.safetensors   optimizer tensors (exp_avg, exp_avg_sq, step) and the torch RNG state
        state.json          optimizer param groups, scheduler, step/epoch/batch position, Python/NumPy RNG

Each checkpoint is written into a temporary folder and renamed into place, so a process killed mid-save
(even with SIGKILL) never leaves a folder that `resume_latest` would pick; the temporary folders such a
kill leaves are removed on the next save or resume. A checkpoint damaged later (a truncated copy, a disk
fault) is skipped on resume with a warning, for the newest one that loads. A save that fails (disk full)
stops with a `CheckpointError` naming the folder, the older checkpoints untouched.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qvlm.errors import QVLMError
from qvlm.models.vlm import read_trainable
from qvlm.utils import atomic_file, atomic_folder

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
LEFTOVER_RE = re.compile(r"^\.(step-\d+)\.(tmp|old)-")  # atomic_folder's temporaries, left by a kill


STATE_KEYS = ("position", "optimizer", "scheduler", "rng_python", "rng_numpy")


class CheckpointError(QVLMError):
    """A checkpoint could not be written (disk full, permissions)."""


@dataclass
class Position:
    """Where training stands: optimizer steps done, epoch, and micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    stream: dict | None = None  # a streamed run: `StreamPosition.to_json()` of all processes' readers


def save_checkpoint(folder: Path, model, optimizer, scheduler, position: Position, keep: int = 2) -> Path:
    path = folder / f"step-{position.step:06d}"
    tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    state = {
        "position": asdict(position),
        "optimizer": opt_json,
        "scheduler": scheduler.state_dict(),
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": _jsonable(np.random.get_state()),
    }
    remove_leftovers(folder)
    try:
        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp / "model")
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "state.json").write_text(json.dumps(state) + "\n")
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise CheckpointError(f"could not save checkpoint {path} ({str(e).splitlines()[0]}); is the disk "
                              f"full? The earlier checkpoints in {folder} are intact: free space and "
                              "rerun with --resume") from e
    for old in sorted(_checkpoints(folder))[:-keep]:
        _remove(old[1])
    return path


def resume_latest(folder: Path, model, optimizer, scheduler) -> tuple[Path, Position] | None:
    """Load the newest checkpoint in `folder` that reads back whole; None when there is none.

    A newer one that does not (truncated safetensors, broken state.json) is passed over with a warning
    naming it: its older siblings are complete, and losing `save_every` steps beats not resuming.
    """
    remove_leftovers(folder)
    for _, path in sorted(_checkpoints(folder), reverse=True):
        try:
            files = _read_checkpoint(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"qvlm: WARNING: checkpoint {path} is damaged ({cause}); trying the one before it",
                  file=sys.stderr, flush=True)
            continue
        return path, _restore(files, path, model, optimizer, scheduler)
    return None


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """Every file of a checkpoint read and parsed before anything is changed: a damaged checkpoint fails
    here and leaves the model as it was. Returns (weights, optimizer tensors, state)."""
    weights = read_trainable(path / "model")
    tensors = load_file(path / "optimizer.safetensors")
    state = json.loads((path / "state.json").read_text())
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    missing += [] if "rng.torch" in tensors else ["rng.torch"]
    if missing:
        raise ValueError(f"incomplete: no {', '.join(missing)}")
    Position(**state["position"])  # TypeError when the position fields are wrong
    return weights, tensors, state


def _restore(files: tuple[dict, dict, dict], path: Path, model, optimizer, scheduler) -> Position:
    """Restore weights, optimizer, scheduler and RNG; return the position to continue from."""
    weights, tensors, state = files
    model.load_trainable(weights, source=str(path))
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(_from_jsonable(state["rng_python"]))
    np.random.set_state(_from_jsonable(state["rng_numpy"]))
    return Position(**state["position"])


def drop_metrics_after(metrics: Path, step: int) -> None:
    """Drop the lines of a metrics JSONL past `step` (and a line cut by the kill): after a resume from
    step N, steps N+1.. are trained and logged again and would otherwise appear twice."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    with atomic_file(metrics) as tmp:
        tmp.write_text("".join(kept))


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders a kill during a save left behind. A kill between atomic_folder's two
    renames leaves the replaced checkpoint as `.step-N.old-*` and no `step-N`: that one is put back."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        match = LEFTOVER_RE.match(p.name)
        if not match:
            continue
        target = folder / match.group(1)
        try:
            if match.group(2) == "old" and not target.exists():
                p.rename(target)
            else:
                _remove(p)
        except OSError:  # another process of this run got there first
            pass


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        match = CHECKPOINT_RE.match(p.name)
        if match and (p / "state.json").is_file():
            found.append((int(match.group(1)), p))
    return found


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict) and "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if isinstance(obj, list):
        return tuple(_from_jsonable(x) for x in obj)
    return obj
