"""Checkpoints that resume a run exactly, in safe formats only (safetensors + JSON, no pickle).

    RUN/checkpoints/step-000500/
        model/              the trainable weights, a loadable `QVLM.save_pretrained` folder
        optimizer.safetensors   optimizer tensors (exp_avg, exp_avg_sq, step) and the torch RNG state
        state.json          optimizer param groups, scheduler, step/epoch/batch position, Python/NumPy RNG

Each checkpoint is written into a temporary folder and renamed into place, so a process killed mid-save
(even with SIGKILL) never leaves a folder that `latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qvlm.utils import atomic_folder

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where training stands: optimizer steps done, epoch, and micro-batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


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
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp / "model")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
    for old in sorted(_checkpoints(folder))[:-keep]:
        _remove(old[1])
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(_checkpoints(folder))
    return found[-1][1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> Position:
    """Restore weights, optimizer, scheduler and RNG; return the position to continue from."""
    from safetensors.torch import load_file as load_weights

    model.load_trainable(load_weights(path / "model" / "model.safetensors"), source=str(path))
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(_from_jsonable(state["rng_python"]))
    np.random.set_state(_from_jsonable(state["rng_numpy"]))
    return Position(**state["position"])


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
