"""Mixed precision: where bf16 pays off, and the two adjustments that make it pay off on CPUs.

CPUs with AMX tiles (Intel Sapphire Rapids and later) multiply bf16 matrices ~7x faster than fp32
(2.4 vs 0.33 TFLOP/s on the 2-core development VM), so `auto` trains in bf16 there as on a GPU. Two
things would eat the gain (docs/BENCHMARKS.md, "fast paths"):
- autocast re-casts frozen fp32 weights at every call; frozen weights need no fp32 master copy, so the
  frozen LM is stored in bf16 instead (the trainable LoRA, adapter and Q-Former stay fp32);
- PyTorch's fused CPU attention kernel is ~10x slower backwards in bf16 than in fp32 at the LM's short
  sequence lengths, while the plain matmul + softmax ("math") kernel runs on the AMX units.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from qvlm.config import ConfigError

CHOICES = ("auto", "fp32", "bf16", "fp16")  # not "no": YAML reads a bare no as false


def cpu_has_bf16_units() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
    return bool(probe and probe())


def resolve(choice: str, device: torch.device, setting: str = "mixed_precision") -> str:
    """`auto` -> "bf16" where the hardware has bf16 matrix units (most GPUs, AMX CPUs), else "fp32"."""
    if choice not in CHOICES:
        raise ConfigError(f"{setting} must be one of {', '.join(CHOICES)}; got {choice!r}")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def store_frozen_in(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters that do not train; trainable ones keep their (fp32) master copies."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def attention_kernels(device: torch.device, precision: str, stage: int):
    """A context choosing the attention kernel for training steps (see the module docstring).

    Stage 2 only: there the LM's causal self-attention dominates (1.10x faster at the paper sizes, 1.5x
    at the offline preset's), while stage 1's Q-Former cross-attention ran 11% slower with it.
    """
    if device.type == "cpu" and precision == "bf16" and stage == 2:
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()
