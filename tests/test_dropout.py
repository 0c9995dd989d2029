"""qvlm's CPU dropout: PyTorch's distribution from a cheaper mask, swapped in for peft's LoRA dropouts."""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from qvlm.models.dropout import Dropout, keep_mask, use_fast_dropout
from qvlm.models.vlm import QVLM


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_drops_a_fraction_p_and_scales_the_rest_to_keep_the_mean(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p, torch.float32)
    kept = mask != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.003  # 1e6 draws: the standard error is <= 5e-4
    scales = mask[kept].unique()
    assert len(scales) == 1 and scales.item() == pytest.approx(1 / (1 - p), rel=1e-4)  # p to 1/65536
    assert abs(mask.mean().item() - 1) < 0.01


def test_mask_draws_are_independent_between_neighbours():
    """Four draws come from each 64-bit number: neighbours must not be correlated."""
    torch.manual_seed(0)
    kept = keep_mask((1_000_000,), 0.5, torch.float32) != 0
    both = (kept[:-1] & kept[1:]).float().mean().item()
    assert abs(both - 0.25) < 0.003


def test_mask_in_bf16_has_the_rounded_scale_as_pytorch_dropout():
    torch.manual_seed(0)
    ours = keep_mask((100, 100), 0.1, torch.bfloat16)
    theirs = nn.functional.dropout(torch.ones(100, 100, dtype=torch.bfloat16), 0.1, training=True)
    assert ours.dtype == torch.bfloat16 and ours.max() == theirs.max()


def test_seeded_masks_repeat_and_successive_ones_differ():
    torch.manual_seed(3)
    first, second = keep_mask((64, 64), 0.3, torch.float32), keep_mask((64, 64), 0.3, torch.float32)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.3, torch.float32), first)
    assert not torch.equal(first, second)


def test_edges_of_p():
    assert torch.equal(keep_mask((5, 7), 0.0, torch.float32), torch.ones(5, 7))
    assert torch.equal(keep_mask((5, 7), 1.0, torch.float32), torch.zeros(5, 7))
    assert keep_mask((3, 5, 7), 0.2, torch.float32).shape == (3, 5, 7)  # 105 elements: not a multiple of 4


def test_dropout_trains_with_the_mask_and_is_the_identity_in_eval():
    torch.manual_seed(0)
    drop = Dropout(0.25)
    x = torch.randn(32, 48, requires_grad=True)
    y = drop(x)
    mask = y.detach() / x.detach()
    kept = mask != 0
    assert 0.6 < kept.float().mean() < 0.9 and torch.allclose(mask[kept], torch.tensor(1 / 0.75), rtol=1e-4)
    y.sum().backward()
    assert torch.allclose(x.grad, mask)  # the gradient flows through the kept elements, scaled alike
    drop.eval()
    assert torch.equal(drop(x), x)


def test_lora_dropouts_are_swapped_both_ways_and_weights_stay_the_same(tiny_config):
    config = tiny_config.override(["lm.lora_dropout=0.1"])
    model = QVLM.build(config)
    lora_dropouts = [layer.lora_dropout["default"] for layer in model.lm.modules() if isinstance(layer, LoraLayer)]
    assert lora_dropouts and all(type(d) is Dropout and d.p == 0.1 for d in lora_dropouts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropouts = sum(isinstance(m, nn.Dropout) for m in model.modules())  # the frozen encoder's too
    assert use_fast_dropout(model, fast=False) >= len(lora_dropouts)  # the Q-Former's too
    assert not any(type(m) is Dropout for m in model.modules())
    assert use_fast_dropout(model) == dropouts and use_fast_dropout(model) == 0
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
