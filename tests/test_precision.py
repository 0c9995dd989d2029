"""Mixed-precision choices: what `auto` resolves to, bf16 storage of frozen weights, attention kernels."""

from dataclasses import replace

import pytest
import torch

from qvlm.config import ConfigError
from qvlm.models.vlm import QVLM
from qvlm.train import precision


def test_resolve_explicit_auto_and_bad_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.resolve("fp32", cpu) == "fp32" and precision.resolve("bf16", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert precision.resolve("auto", cpu) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert precision.resolve("auto", cpu) == "fp32"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        precision.resolve("fp8", cpu)


def test_frozen_lm_weights_go_bf16_trainable_stay_fp32(tiny_config, tiny_images):
    model = QVLM.build(tiny_config)
    precision.store_frozen_in(model.lm, torch.bfloat16)
    frozen = {p.dtype for p in model.lm.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.lm.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    # generation runs without autocast on the mixed-dtype LM (validation does this mid-training)
    answers = model.generate_from_features(model.encode_images(tiny_images[:2]), ["q", "q"], max_new_tokens=3)
    assert len(answers) == 2


def test_math_attention_only_for_bf16_stage2_on_cpu():
    with precision.attention_kernels(torch.device("cpu"), "bf16", stage=2):
        # the switches are process-wide; torch names them under `cuda` but they govern every device
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    for precision_, stage in (("fp32", 2), ("bf16", 1)):
        with precision.attention_kernels(torch.device("cpu"), precision_, stage):
            assert torch.backends.cuda.flash_sdp_enabled()


def test_every_choice_survives_a_command_line_override(tiny_config):
    for choice in precision.CHOICES:  # YAML would read a bare `no` as false
        assert tiny_config.override([f"stage2.mixed_precision={choice}"]).stage2.mixed_precision == choice


def test_encoder_in_bf16_gives_fp32_features_near_fp32_under_its_own_cache_key(tiny_config, tiny_images):
    from qvlm.models.vision import FrozenVisionEncoder

    encoders = {p: FrozenVisionEncoder.build(replace(tiny_config.vision, precision=p)) for p in ("fp32", "bf16")}
    encoders["bf16"].load_state_dict(encoders["fp32"].state_dict())
    features = {p: enc(enc.preprocess(tiny_images)) for p, enc in encoders.items()}
    assert {f.dtype for f in features.values()} == {torch.float32}
    error = (features["bf16"] - features["fp32"]).norm(dim=-1) / features["fp32"].norm(dim=-1)
    assert 0 < error.max() < 0.05  # computed in bf16 (not equal), yet close
    # a cache built by one must never answer for the other
    assert encoders["fp32"].cache_key.endswith("px") and encoders["bf16"].cache_key.endswith("px+bfloat16")
    with pytest.raises(ConfigError, match="vision.precision must be one of"):
        FrozenVisionEncoder.build(replace(tiny_config.vision, precision="int8"))
