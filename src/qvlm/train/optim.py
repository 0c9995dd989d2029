"""Parameter groups with differential learning rates, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from qvlm.config import QVLMConfig

# Tensors of 2 or more dimensions that are not matmul weights: the learned query tokens [1, Nq, D]
# and embedding tables [V, D]. (The temperature is 0-D; named so that no reshaping can make it decay.)
NO_DECAY_NAMES = ("query_tokens", "embedding", "log_inv_temp")


def decays(name: str, param: nn.Parameter) -> bool:
    """Weight decay by rank: matrices (≥ 2-D) decay; biases, norm scales and shifts (1-D) and the
    named exceptions do not. Names alone miss modules such as `itg_transform.2` (a LayerNorm)."""
    return param.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def _split_decay(named: list[tuple[str, nn.Parameter]]) -> tuple[list, list]:
    decay = [p for n, p in named if decays(n, p)]
    no_decay = [p for n, p in named if not decays(n, p)]
    return decay, no_decay


def _groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, name: str) -> list[dict]:
    decay, no_decay = _split_decay(named)
    return [g for g in ({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
            if g["params"]]


def stage1_param_groups(model, config: QVLMConfig) -> list[dict]:
    """Copied text layers at `lr_pretrained` (article 1e-5); queries, cross-attention, heads at `lr_new`."""
    copied = model.qformer.pretrained_parameter_names()
    named = [(n, p) for n, p in model.qformer.named_parameters() if p.requires_grad]
    c = config.stage1
    return (_groups([(n, p) for n, p in named if n in copied], c.lr_pretrained, c.weight_decay, "pretrained")
            + _groups([(n, p) for n, p in named if n not in copied], c.lr_new, c.weight_decay, "new"))


def stage2_param_groups(model, config: QVLMConfig) -> list[dict]:
    """Q-Former (article 1e-4; optional), adapter + LoRA (article 5e-4)."""
    c = config.stage2
    groups = []
    if c.train_qformer:
        named = [(n, p) for n, p in model.qformer.named_parameters() if p.requires_grad]
        groups += _groups(named, c.lr_qformer, c.weight_decay, "qformer")
    else:
        model.qformer.requires_grad_(False)
    named = [(f"adapter.{n}", p) for n, p in model.adapter.named_parameters()]
    named += [(n, p) for n, p in model.lm.named_parameters() if p.requires_grad]
    groups += _groups(named, c.lr_adapter_lora, c.weight_decay, "adapter_lora")
    return groups


def make_optimizer(groups: list[dict], fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; `fused` (one kernel per step instead of ~10 ops per tensor; a CPU kernel since torch 2.4)
    where every parameter allows it. `fused=False` is the per-tensor (foreach) update the bench compares."""
    fused = fused and all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32
                          for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), fused=fused or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to each group's lr, then cosine decay to 10% of it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine_factor(warmup_steps, total_steps))


def redraw_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, warmup_steps: int, total_steps: int) -> None:
    """Decay over a new total from here on (a time budget cut the plan); steps taken keep their lr."""
    scheduler.lr_lambdas = [_warmup_cosine_factor(warmup_steps, total_steps)] * len(scheduler.lr_lambdas)


def _warmup_cosine_factor(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
