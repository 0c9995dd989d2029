"""`qvlm demo --smoke`: the whole pipeline on the real offline bundle, end to end (issue 7)."""

import json

import pytest
from PIL import Image

from qvlm.cli.main import main


@pytest.mark.bundle
@pytest.mark.slow
def test_demo_smoke_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "easy-VQA test" in printed and "qvlm caption" in printed and "qvlm serve" in printed
    summary = json.loads((out / "run" / "demo.json").read_text())
    assert summary["vqa"]["n"] == 16 and 0.0 <= summary["vqa"]["exact_match"] <= 1.0
    assert {"color", "shape", "yes/no"} <= set(summary["vqa"]["per_type"])
    assert summary["question_prior"]["n"] == 16 and "answering from the question alone" in printed
    for name in ("loss.png", "similarity.png", "attention.png", "word_attention.png"):
        with Image.open(out / "run" / "report" / name) as img:
            assert img.format == "PNG" and img.size[0] > 100
    assert "<img" in (out / "run" / "report" / "gallery.html").read_text()
    # the run folder is an ordinary one: other commands accept it
    image = next((out / "data" / "images" / "test").iterdir())
    assert main(["ask", str(out / "run"), str(image), "what color is the shape?", "--json"]) == 0
    assert "text" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_takes_seed_and_overrides_and_rejects_a_bad_one_before_any_work(tmp_path):
    from qvlm.config import ConfigError
    from qvlm.demo import PLANS, demo_config, run_demo

    config = demo_config(PLANS["default"], "default", seed=3, overrides=["stage2.mixed_precision=fp32",
                                                                          "stage2.max_steps=7"])
    assert config.train.seed == 3 and config.stage2.mixed_precision == "fp32"
    assert config.stage2.batch_size == PLANS["default"].stage2_batch_size  # the plan sets it, not the preset
    assert config.stage2.max_steps == 7  # --set wins over the plan
    with pytest.raises(ConfigError, match="mixed_precision"):
        run_demo(tmp_path / "demo", "default", overrides=["stage2.mixed_precision=no"])
    assert not (tmp_path / "demo").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("argv", "stage1_budget_s"), [
    ([], 0.35 * 15 * 60),  # the default plan keeps to 15 minutes
    (["--minutes", "8"], 0.35 * 8 * 60),
    (["--minutes", "0"], None),  # every planned step
    (["--full"], None),
    (["--full", "--minutes", "40"], 0.35 * 40 * 60),
])
def test_demo_budget_gives_stage1_its_share_and_is_said_up_front(argv, stage1_budget_s, tmp_path, monkeypatch, capsys):
    import qvlm.bundle
    import qvlm.data.bundled
    import qvlm.train.trainer

    def fake_easyvqa(out):  # one record per split: the demo only needs the manifests to exist here
        out.mkdir(parents=True)
        for split in ("train", "val", "test"):
            (out / f"{split}.jsonl").write_text(json.dumps({"image": f"{split}.png", "caption": "a shape"}) + "\n")

    seen = {}

    def fake_train(config, stage, *args, **kwargs):
        seen["stage1_budget_s"] = config.stage1.time_budget_s
        raise _Stop

    monkeypatch.setattr(qvlm.bundle, "fetch", lambda: None)
    monkeypatch.setattr(qvlm.data.bundled, "build_easyvqa", fake_easyvqa)
    monkeypatch.setattr(qvlm.train.trainer, "train", fake_train)
    with pytest.raises(_Stop):
        main(["demo", "--out", str(tmp_path / "demo"), *argv])
    assert seen["stage1_budget_s"] == stage1_budget_s
    assert ("time plan: at most about" in capsys.readouterr().out) == (stage1_budget_s is not None)
