"""`qvlm bench` (issue 9): the harness runs both modes and reports consistent figures."""

import json

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
