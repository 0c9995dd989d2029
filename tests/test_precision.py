"""Mixed-precision choices: what `auto` resolves to, bf16 storage of frozen weights, attention kernels."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qvlm import precision
from qvlm.config import ConfigError
from qvlm.models.vlm import QVLM


@pytest.fixture
def fake_probe(tmp_path, monkeypatch, private_cache):
    """A fresh cache home and probe memory; returns `set(fp32_s, bf16_s)` to fake the probe's timings,
    and `calls`, how many times the workloads were timed."""
    monkeypatch.setattr(precision, "_probes", {})
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Test CPU 9000")
    timings, calls = {}, []

    def timed():
        calls.append(1)
        return {"matmul": [timings["fp32"], timings["bf16"]], "LM block fwd+bwd": [timings["fp32"], timings["bf16"]]}

    monkeypatch.setattr(precision, "_time_workloads", timed)

    def set_timings(fp32: float, bf16: float):
        timings.update(fp32=fp32, bf16=bf16)
        precision._probes.clear()  # as a new process would
    return set_timings, calls


def test_explicit_choices_and_bad_choices():
    cpu = torch.device("cpu")
    assert precision.resolve("fp32", cpu) == "fp32" and precision.resolve("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="mixed_precision must be one of"):
        precision.resolve("fp8", cpu)
    assert precision.explain("fp32", cpu, "stage2.mixed_precision") == "precision: fp32 (stage2.mixed_precision=fp32)"


@pytest.mark.parametrize(("fp32", "bf16", "choice"), [(2.0, 1.0, "bf16"), (1.0, 3.0, "fp32"), (1.1, 1.0, "fp32")])
def test_auto_on_cpu_follows_the_measured_ratio_with_a_margin(fake_probe, fp32, bf16, choice):
    set_timings, calls = fake_probe
    set_timings(fp32, bf16)
    assert precision.resolve("auto", torch.device("cpu")) == choice  # 1.1x is inside the margin: fp32
    line = precision.explain("auto", torch.device("cpu"))
    assert line.startswith(f"precision: {choice} (bf16 {fp32 / bf16:.2f}x fp32 on Test CPU 9000, probed 20")
    assert ("needs >= 1.15x" in line) == (choice == "fp32") and len(calls) == 1


def test_probe_is_cached_per_cpu_and_torch_version(fake_probe, monkeypatch, tmp_path):
    set_timings, calls = fake_probe
    set_timings(2.0, 1.0)
    assert precision.resolve("auto", torch.device("cpu")) == "bf16"
    set_timings(1.0, 2.0)  # a new process on the same machine: the cached choice stands, no new probe
    assert precision.resolve("auto", torch.device("cpu")) == "bf16" and len(calls) == 1
    saved = json.loads((tmp_path / "cache" / precision.PROBE_FILE).read_text())
    entry = saved[f"Test CPU 9000 | torch {torch.__version__}"]
    assert entry["choice"] == "bf16" and entry["ratio"] == pytest.approx(2.0) and entry["seconds"]["matmul"] == [2, 1]
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # a torch upgrade measures again
    assert precision.resolve("auto", torch.device("cpu")) == "fp32" and len(calls) == 2
    monkeypatch.setattr(precision, "cpu_model_name", lambda: "Other CPU")  # so does another CPU sharing the home
    set_timings(3.0, 1.0)
    assert precision.resolve("auto", torch.device("cpu")) == "bf16" and len(calls) == 3
    assert len(json.loads((tmp_path / "cache" / precision.PROBE_FILE).read_text())) == 3


def test_cpu_without_native_bf16_keeps_fp32_without_probing(fake_probe, monkeypatch):
    set_timings, calls = fake_probe
    set_timings(9.0, 1.0)  # would say bf16, but emulated bf16 is never trusted
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve("auto", torch.device("cpu")) == "fp32" and not calls
    assert precision.explain("auto", torch.device("cpu")) == "precision: fp32 (auto: Test CPU 9000 has no native bf16)"


def test_gpu_path_asks_cuda_not_the_probe(fake_probe, monkeypatch):
    set_timings, calls = fake_probe
    cuda = torch.device("cuda")
    for supported, choice in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve("auto", cuda) == choice
    assert not calls


def test_vision_auto_uses_the_same_decision(fake_probe, tiny_config):
    from qvlm.models.vision import FrozenVisionEncoder

    set_timings, _ = fake_probe
    for fp32, bf16, dtype in ((2.0, 1.0, torch.bfloat16), (1.0, 2.0, None)):
        set_timings(fp32, bf16)
        (Path(os.environ["QVLM_CACHE"]) / precision.PROBE_FILE).unlink(missing_ok=True)  # a new machine
        encoder = FrozenVisionEncoder.build(replace(tiny_config.vision, precision="auto"))
        assert encoder.compute_dtype == dtype and precision.resolve("auto", torch.device("cpu")) == (
            "bf16" if dtype else "fp32")


def test_real_probe_times_every_workload_in_both_dtypes(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLM_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_probes", {})
    probe = precision.cpu_probe()
    assert probe.cpu == precision.cpu_model_name() and probe.torch == torch.__version__
    if not probe.native_bf16:
        pytest.skip("this CPU has no native bf16: nothing is timed")
    assert {"LM block fwd+bwd"} < set(probe.seconds) and all(0 < s < 5 for t in probe.seconds.values() for s in t)
    assert probe.choice == ("bf16" if probe.ratio >= precision.MARGIN else "fp32")


def test_frozen_lm_weights_go_bf16_trainable_stay_fp32(tiny_config, tiny_images):
    model = QVLM.build(tiny_config)
    precision.store_frozen_in(model.lm, torch.bfloat16)
    frozen = {p.dtype for p in model.lm.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.lm.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    # generation runs without autocast on the mixed-dtype LM (validation does this mid-training)
    answers = model.generate_from_features(model.encode_images(tiny_images[:2]), ["q", "q"], max_new_tokens=3)
    assert len(answers) == 2


def test_lora_layers_leave_their_input_to_autocast_in_bf16_steps(tiny_config, tiny_images):
    """peft would cast the bf16 input up to its fp32 LoRA weights, and autocast straight back down."""
    from peft.tuners.lora import LoraLayer

    from qvlm.models.processing import build_stage2_batch

    model = QVLM.build(tiny_config)
    precision.store_frozen_in(model.lm, torch.bfloat16)
    lora_a = next(m for m in model.lm.modules() if isinstance(m, LoraLayer)).lora_A["default"]
    seen = []
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    batch = build_stage2_batch(model.tokenizer, ["what?", "where?"], ["a cat", "here"], model.qformer.num_queries)
    features = model.encode_images(tiny_images[:2])
    losses = []
    for autocast in (False, True):
        with precision.lora_input_casts_off(model, autocast=autocast), torch.autocast("cpu", torch.bfloat16):
            losses.append(model(features, **batch).loss)
    assert seen == [torch.float32, torch.bfloat16]
    assert torch.allclose(losses[0], losses[1], rtol=0.02)
    assert all(m.cast_input_dtype_enabled for m in model.lm.modules() if isinstance(m, LoraLayer))  # restored


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
