"""`qvlm bench` (issue 9): the harness runs both modes and reports consistent figures."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from qvlm.cli.main import main


def test_bench_tiny_compare_baseline_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--compare-baseline", "--ablate",
                 "--steps", "1", "--warmup", "0", "--set", "vision.precision=bf16", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    for stage in ("stage1", "stage2"):
        fast, base = result[stage]["fast"], result[stage]["baseline"]
        assert fast["samples_per_s"] > 0 and base["samples_per_s"] > 0 and base["batch"] == 8
        assert abs(result[stage]["speedup"] - fast["samples_per_s"] / base["samples_per_s"]) < 1e-9
    # the article's LM runs under bf16 autocast, its Q-Former in fp32, both without a feature cache
    assert result["stage2"]["baseline"]["recipe"]["bf16"] and not result["stage1"]["baseline"]["recipe"]["bf16"]
    assert not result["stage2"]["baseline"]["recipe"]["feature_cache"]
    assert not result["stage2"]["baseline"]["recipe"]["labelled_logits"]
    assert result["stage2"]["fast"]["recipe"]["labelled_logits"] and result["stage2"]["fast"]["tflops"] > 0
    # each fast path turned off alone, measured in the same run
    common = {"encoder per sample in the loop", "batch 8", "unfused AdamW"}
    assert common <= set(result["stage1"]["ablation"])
    assert common | {"logits at every position"} <= set(result["stage2"]["ablation"])
    assert result["stage2"]["ablation"]["batch 8"]["batch"] == 8
    assert result["stage2"]["fast"]["seq_len"] == result["stage2"]["baseline"]["seq_len"]
    assert result["extract"]["images_per_s"] > 0 and result["generate"]["batched"]["tokens_per_s"] > 0
    assert result["extract"]["dtype"] == "torch.bfloat16" and result["extract"]["fp32_images_per_s"] > 0
    assert result["projected_hours"]["fast"] > 0 and result["projected_hours"]["baseline"] > 0
    assert result["peak_memory_gib"] > 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "turned off alone" in printed


def test_bench_compile_times_the_compiled_step_and_reports_compile_time(tmp_path, capsys):
    out = tmp_path / "bench.json"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--compile", "--steps", "1", "--warmup", "0",
                 "--json-out", str(out)]) == 0
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # dynamo compiled the training forward
    result = json.loads(out.read_text())
    for stage in ("stage1", "stage2"):
        fast = result[stage]["fast"]
        assert fast["recipe"]["compile"] and fast["first_step_s"] > 0 and fast["samples_per_s"] > 0
    assert "(compiling)" in capsys.readouterr().out


def test_bench_trains_each_stage_in_its_mixed_precision_as_train_does(tmp_path, monkeypatch, capsys):
    from qvlm import precision

    out = tmp_path / "bench.json"
    probe = precision.CpuProbe(choice="bf16", ratio=2.0, cpu="Test CPU", torch=torch.__version__,
                               probed="2025-01-01", seconds={}, native_bf16=True)
    monkeypatch.setattr(precision, "cpu_probe", lambda: probe)  # `auto` as a CPU where bf16 measured 2x faster
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--set", "stage1.mixed_precision=auto", "--set", "stage2.mixed_precision=fp32",
                 "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    stage1, stage2 = result["stage1"]["fast"]["recipe"], result["stage2"]["fast"]["recipe"]
    assert stage1["bf16"] and not stage2["bf16"] and not stage2["frozen_bf16"] and not stage2["math_attention"]
    assert result["precision"] == {
        "stage1": "precision: bf16 (bf16 2.00x fp32 on Test CPU, probed 2025-01-01)",
        "stage2": "precision: fp32 (stage2.mixed_precision=fp32)"}
    # achieved FLOP/s as a fraction of this machine's measured matmul peak in the stage's own dtype
    for stage, dtype in (("stage1", "bfloat16"), ("stage2", "float32")):
        fast = result[stage]["fast"]
        assert fast["peak_fraction"] == pytest.approx(fast["tflops"] / result["matmul_peak_tflops"][dtype])
    printed = capsys.readouterr().out
    assert "stage 2 precision: fp32 (stage2.mixed_precision=fp32)" in printed
    assert "of the measured float32 matmul peak" in printed and "of the measured bfloat16 matmul peak" in printed


def test_bench_refuses_fp16_with_what_to_set(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--set", "stage2.mixed_precision=fp16"]) == 1
    assert "set stage2.mixed_precision to fp32, bf16 or auto" in capsys.readouterr().err


def test_gpu_check_entry_runs_bench_and_real_training_on_cpu(tmp_path):
    """bench/gpu.sh's Python, at tiny sizes on CPU: the same code a GPU session runs in one go."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--preset", "tiny", "--device", "cpu", "--parts", "eager,train",
                           "--steps", "1", "--warmup", "0", "--train-steps", "3", "--images", "16"]) == 0
    result = json.loads((out / "gpu.json").read_text())
    assert {"eager", "train"} <= set(result) and "compile" not in result and "ablate" not in result
    assert result["eager"]["stage2"]["speedup"] > 0 and result["eager"]["stage2"]["fast"]["peak_fraction"] > 0
    for stage in ("stage1", "stage2"):  # real `qvlm train` runs: both stages stepped and stayed finite
        run = result["train"][stage]
        assert run["steps"] == 3 and run["wall_s"] > 0 and math.isfinite(run["last_loss"])
    table = (out / "gpu.md").read_text()
    assert "| stage-2 fraction of measured matmul peak |" in table and "| stage2 | 3 | 4 |" in table
