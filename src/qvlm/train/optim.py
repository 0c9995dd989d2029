"""Parameter groups with differential learning rates; the optimiser and the learning-rate schedule that
a stage's config names (`stageN.optimizer`, `stageN.schedule`)."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import transformers
from torch import nn

from qvlm.config import ConfigError, QVLMConfig, Stage1Config, Stage2Config

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


def _groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, name: str,
            scope: str = "matrices") -> list[dict]:
    """One group that decays and one that does not; `scope="all"` decays every tensor (the article's
    AdamW(params) with its default decay)."""
    decay, no_decay = _split_decay(named) if scope == "matrices" else ([p for _, p in named], [])
    return [g for g in ({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": weight_decay},
                        {"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
            if g["params"]]


def stage1_param_groups(model, config: QVLMConfig) -> list[dict]:
    """Copied text layers at `lr_pretrained` (article 1e-5); queries, cross-attention, heads at `lr_new`."""
    copied = model.qformer.pretrained_parameter_names()
    named = [(n, p) for n, p in model.qformer.named_parameters() if p.requires_grad]
    c = config.stage1
    return (_groups([(n, p) for n, p in named if n in copied], c.lr_pretrained, c.weight_decay, "pretrained",
                    c.decay_scope)
            + _groups([(n, p) for n, p in named if n not in copied], c.lr_new, c.weight_decay, "new", c.decay_scope))


def stage2_param_groups(model, config: QVLMConfig) -> list[dict]:
    """Q-Former (article 1e-4; optional), adapter + LoRA (article 5e-4)."""
    c = config.stage2
    groups = []
    if c.train_qformer:
        named = [(n, p) for n, p in model.qformer.named_parameters() if p.requires_grad]
        groups += _groups(named, c.lr_qformer, c.weight_decay, "qformer", c.decay_scope)
    else:
        model.qformer.requires_grad_(False)
    named = [(f"adapter.{n}", p) for n, p in model.adapter.named_parameters()]
    named += [(n, p) for n, p in model.lm.named_parameters() if p.requires_grad]
    groups += _groups(named, c.lr_adapter_lora, c.weight_decay, "adapter_lora", c.decay_scope)
    return groups


def build_optimizer(groups: list[dict], stage_cfg: Stage1Config | Stage2Config,
                    fused: bool = True) -> torch.optim.Optimizer:
    """`stage_cfg.optimizer` (Adam or AdamW) with `stage_cfg.adam_betas` over `groups`.

    `fused` (one kernel per step instead of ~10 ops per tensor; a CPU kernel since torch 2.4) where every
    parameter allows it; `fused=False` is the per-tensor (foreach) update the bench compares."""
    betas = stage_cfg.adam_betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas}")
    fused = fused and all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32
                          for g in groups for p in g["params"])
    optimizer = torch.optim.Adam if stage_cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, betas=tuple(betas), fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, stage_cfg: Stage1Config | Stage2Config,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate multiplier per optimizer step that `stage_cfg.schedule` names:

    - "constant": transformers' constant schedule (after `warmup_steps` of its linear warm-up, if any);
    - "hf_cosine": transformers' `get_cosine_schedule_with_warmup` (the article's stage 2): linear from 0
      over `warmup_steps`, then a half cosine to 0 at `total_steps`;
    - "warmup_cosine": linear from lr/(warmup_steps+1), then a half cosine to 10% of the lr (never 0, so
      the last steps still learn).
    """
    kind, warmup = stage_cfg.schedule, stage_cfg.warmup_steps
    if kind == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    if kind == "hf_cosine":
        return transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps))


def redraw_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, warmup_steps: int, total_steps: int) -> None:
    """Decay over a new total from here on (a time budget cut the plan); steps taken keep their lr.

    Works for every `build_schedule` kind: transformers' schedules are `functools.partial`s whose
    keywords are replaced (a constant one has no total to replace), ours is a `WarmupCosine`."""
    scheduler.lr_lambdas = [_redrawn(f, warmup_steps, total_steps) for f in scheduler.lr_lambdas]


def _redrawn(factor, warmup_steps: int, total_steps: int):
    if isinstance(factor, WarmupCosine):
        return WarmupCosine(warmup_steps, total_steps)
    if isinstance(factor, functools.partial):
        new = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
        return functools.partial(factor.func, *factor.args,
                                 **{k: new.get(k, v) for k, v in factor.keywords.items()})
    raise TypeError(f"cannot redraw a learning-rate schedule of type {type(factor).__name__}")


@dataclasses.dataclass
class WarmupCosine:
    """Linear warm-up to the lr, then cosine decay to 10% of it. A callable object rather than a closure,
    so `redraw_schedule` can redraw it and LambdaLR's state_dict (the checkpoint) records its steps."""

    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
