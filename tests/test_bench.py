"""`qvlm bench` (issue 9): the harness runs both modes and reports consistent figures."""

import json

from qvlm.cli.main import main


def test_bench_tiny_compare_baseline_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--compare-baseline", "--steps", "1",
                 "--warmup", "0", "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    for stage in ("stage1", "stage2"):
        fast, base = result[stage]["fast"], result[stage]["baseline"]
        assert fast["samples_per_s"] > 0 and base["samples_per_s"] > 0 and base["batch"] == 8
        assert abs(result[stage]["speedup"] - fast["samples_per_s"] / base["samples_per_s"]) < 1e-9
    assert result["stage2"]["baseline"]["bf16"] is True  # the article's LM runs under bf16 autocast
    assert result["stage2"]["fast"]["seq_len"] == result["stage2"]["baseline"]["seq_len"]
    assert result["extract"]["images_per_s"] > 0 and result["generate"]["batched"]["tokens_per_s"] > 0
    assert result["projected_hours"]["fast"] > 0 and result["projected_hours"]["baseline"] > 0
    assert result["peak_memory_gib"] > 0
    assert "speedup" in capsys.readouterr().out
