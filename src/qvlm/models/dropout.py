"""Dropout with a mask five times cheaper to draw on CPUs than PyTorch's, same distribution.

On a CPU, `F.dropout` draws its mask with `bernoulli_`: one call of the serial Mersenne twister per
element, about 5 ns each and on one thread however many the machine has. With LoRA on q/k/v/o of a
30-layer LM that is 120 masks per step, a fifth of a bf16 stage-2 step at the `paper` sizes
(docs/BENCHMARKS.md). Here each 64-bit random number gives four 16-bit draws, and an element is kept
when its draw clears a threshold: P(keep) = 1 - p with p rounded to a multiple of 1/65536, and kept
elements scaled by 1 / (1 - p) as `F.dropout` does. Elsewhere (GPUs, eval mode, p = 0) it is `nn.Dropout`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LEVELS = 1 << 16  # the resolution of p: one 16-bit draw per element


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> torch.Tensor:
    """A dropout mask of `shape` in `dtype`: 0 with probability p (to 1/65536), else 1 / (1 - p)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # every bit random
    draws = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    dropped_levels = round(p * _LEVELS)
    if dropped_levels == _LEVELS:
        return torch.zeros(shape, dtype=dtype)
    keep = draws >= dropped_levels - _LEVELS // 2  # P = (65536 - dropped_levels) / 65536
    return keep.to(dtype).mul_(_LEVELS / (_LEVELS - dropped_levels))


class Dropout(nn.Dropout):
    """`nn.Dropout`, whose training-mode mask on CPU comes from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return x * keep_mask(x.shape, self.p, x.dtype)  # autograd keeps the mask for the backward


def use_fast_dropout(model: nn.Module, fast: bool = True) -> int:
    """Make every dropout module of `model` (peft's LoRA dropouts among them) a `Dropout`, or with
    `fast=False` a plain `nn.Dropout` again. Returns how many were swapped. The modules hold no
    weights, so checkpoints are unchanged.
    """
    wanted = Dropout if fast else nn.Dropout
    swaps = [(parent, name, child.p) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Dropout) and type(child) is not wanted]
    for parent, name, p in swaps:
        setattr(parent, name, wanted(p))
    return len(swaps)
