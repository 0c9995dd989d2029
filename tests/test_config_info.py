"""Config round-trip and errors; `qvlm info` parameter counts without downloading."""

import json

import pytest

from qvlm.cli.main import main
from qvlm.config import ConfigError, QVLMConfig, get_preset


@pytest.mark.parametrize("preset", ["paper", "offline", "captions", "tiny"])
def test_config_round_trips_json_and_yaml(preset, tmp_path):
    config = get_preset(preset)
    for name in ("c.json", "c.yaml"):
        config.save(tmp_path / name)
        assert QVLMConfig.load(tmp_path / name) == config


def test_unknown_keys_and_bad_values_are_rejected_clearly(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"stage1": {"lr_neww": 1.0}}))
    with pytest.raises(ConfigError, match=r"stage1\.lr_neww.*valid keys in stage1: .*lr_new"):
        QVLMConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="unknown config section 'stagee1'"):
        get_preset("tiny").override(["stagee1.lr_new=1"])
    with pytest.raises(ConfigError, match="stage1.epochs expects an integer or auto, got 'many'"):
        get_preset("tiny").override(["stage1.epochs=many"])
    with pytest.raises(ConfigError, match="stage2.max_answer_tokens expects an integer, auto or null, got 'x'"):
        get_preset("tiny").override(["stage2.max_answer_tokens=x"])
    with pytest.raises(ConfigError, match="stage1.batch_size expects int, got 'auto'"):  # auto only where documented
        get_preset("tiny").override(["stage1.batch_size=auto"])
    assert get_preset("tiny").override(["stage1.lr_new=1e-4"]).stage1.lr_new == 1e-4
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_info_paper_counts_without_download(capsys):
    assert main(["info", "--preset", "paper", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["lora"] == {"total": 7_372_800, "trainable": 7_372_800}
    assert 85_000_000 < counts["vision"]["total"] < 87_000_000 and counts["vision"]["trainable"] == 0
    assert counts["lm"]["trainable"] == 0 and 134_000_000 < counts["lm"]["total"] < 135_000_000
    # adapter Linear(768->576) -> ReLU -> Linear(576->576)
    assert counts["adapter"]["total"] == 768 * 576 + 576 + 576 * 576 + 576
    # DistilBERT's 6 layers + embeddings (66M) + 3 cross-attention blocks + heads
    assert 70_000_000 < counts["qformer"]["total"] < 80_000_000
    assert main(["info", "--preset", "paper", "--set", "lm.lora_targets=[q_proj,k_proj,v_proj,o_proj,"
                 "gate_proj,up_proj,down_proj]", "--json"]) == 0
    assert 19_000_000 < json.loads(capsys.readouterr().out)["lora"]["total"] < 20_000_000
