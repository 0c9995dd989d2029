"""Evaluation over datasets (qvlm.eval.evaluate), `qvlm eval` and `qvlm report` on tiny untrained runs."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlm.cli.main import main
from qvlm.data.cache import FeatureCache
from qvlm.eval.evaluate import (
    evaluate_captions,
    evaluate_retrieval,
    evaluate_vqa,
    image_groups,
    load_records,
    write_report,
)

N_IMAGES = 6


def _make_run(run: Path, stage: int, itm_weight: float = 0.0) -> Path:
    from qvlm.config import get_preset
    from qvlm.models.vlm import QVLM

    cfg = get_preset("tiny")
    cfg.stage1.itm_weight = itm_weight
    cfg.train.feature_cache = str(run / "training-cache")
    QVLM.build(cfg, stage=stage).save_pretrained(run / "model")
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A manifest of 6 images (+1 corrupt): two captions each, one colour question each."""
    root = tmp_path_factory.mktemp("evaldata")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "captions": [f"a picture of thing {i}", f"image {i}"]})
        rows.append({"image": f"imgs/{i}.png", "question": "what color is it?",
                     "answer": ["red", "blue"][i % 2], "answer_type": "color" if i < 4 else "yes/no"})
    (root / "imgs" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows.append({"image": "imgs/bad.png", "caption": "a broken file"})
    rows.append({"image": "imgs/bad.png", "question": "what is it?", "answer": "red", "answer_type": "color"})
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "test.jsonl"


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "s2", stage=2)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "s1", stage=1, itm_weight=0.5)


@pytest.fixture(scope="module")
def models(stage1_run, stage2_run):
    from qvlm.models.vlm import QVLM

    return QVLM.from_pretrained(stage1_run), QVLM.from_pretrained(stage2_run)


RECALL_KEYS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def test_image_groups_merges_one_line_per_caption(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "one"}, {"image": "a.png", "caption": "two"},
            {"image": "a.png", "question": "q?", "answer": "x"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_records(tmp_path / "m.jsonl")
    groups = image_groups(records)
    assert len(groups) == 1 and groups[0][1] == ["one", "two"]


def test_retrieval_with_itm_and_skips(models, data):
    stage1, _ = models
    records, _ = load_records(data)
    out = evaluate_retrieval(stage1, records, batch_size=4)
    for key in RECALL_KEYS:
        assert 0.0 <= out[key] <= 1.0
        assert 0.0 <= out[f"itm_{key}"] <= 1.0  # the run's config has stage1.itm_weight > 0
    assert (out["n_images"], out["n_texts"]) == (N_IMAGES, 2 * N_IMAGES)
    assert out["skipped"] == 1 and sum(out["skipped_reasons"].values()) == 1
    # R@10 over 6 images (12 texts for i2t) must be 1.0 whatever the model
    assert out["t2i_r10"] == 1.0 and out["itm_t2i_r10"] == 1.0
    assert "itm_i2t_r1" not in evaluate_retrieval(stage1, records, batch_size=4, itm=False)


def test_cache_encodes_each_image_once(models, data, tmp_path):
    _, stage2 = models
    records, _ = load_records(data)
    cache = FeatureCache(tmp_path / "cache", encoder=stage2.vision)
    first = evaluate_vqa(stage2, records, batch_size=4, cache=cache, max_new_tokens=2)
    assert cache.misses == N_IMAGES  # 6 questions on 6 readable images; the bad one is not encoded
    no_cache = evaluate_vqa(stage2, records, batch_size=4, max_new_tokens=2)
    assert [p["prediction"] for p in first["predictions"]] == [p["prediction"] for p in no_cache["predictions"]]
    again = FeatureCache(tmp_path / "cache", encoder=stage2.vision)
    evaluate_retrieval(stage2, records, batch_size=4, cache=again)
    assert again.misses == 0


def test_vqa_and_caption_results(models, data):
    _, stage2 = models
    records, _ = load_records(data)
    vqa = evaluate_vqa(stage2, records, batch_size=4, max_new_tokens=2)
    assert vqa["n"] == N_IMAGES and vqa["skipped"] == 1
    assert set(vqa["per_type"]) == {"color", "yes/no"} and vqa["per_type"]["color"]["n"] == 4
    pred = vqa["predictions"][0]
    assert {"key", "image", "question", "prediction", "answers", "answer_type", "correct"} <= set(pred)
    assert evaluate_vqa(stage2, records, batch_size=4, limit=2, max_new_tokens=2)["n"] == 2
    cap = evaluate_captions(stage2, records, batch_size=4, max_new_tokens=3)
    assert {"bleu4", "rouge_l", "cider"} <= set(cap) and cap["n"] == N_IMAGES and cap["skipped"] == 1
    assert cap["predictions"][0]["references"] == ["a picture of thing 0", "image 0"]


def test_stage1_cannot_caption(models, data):
    from qvlm.errors import QVLMError

    records, _ = load_records(data)
    with pytest.raises(QVLMError, match="stage-1"):
        evaluate_captions(models[0], records)


@pytest.mark.parametrize("task, keys", [
    ("retrieval", RECALL_KEYS + ["mean_recall", "n_images", "n_texts"]),
    ("vqa", ["exact_match", "soft_accuracy", "per_type"]),
    ("caption", ["bleu4", "rouge_l", "cider"]),
])
def test_eval_cli_writes_json(task, keys, stage1_run, stage2_run, data, tmp_path, capsys):
    run = stage1_run if task == "retrieval" else stage2_run
    out = tmp_path / f"{task}.json"
    rc = main(["eval", str(run), "--data", str(data), "--task", task, "--json-out", str(out),
               "--batch-size", "4", "--max-new-tokens", "2"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(keys) <= set(result) and result["task"] == task and result["skipped"] == 1
    if task == "vqa":
        assert {"color", "yes/no"} <= set(result["per_type"])
        assert {"exact_match", "soft_accuracy", "n"} <= set(result["per_type"]["color"])
    stdout = capsys.readouterr().out
    assert str(out) in stdout
    assert (run / "training-cache").is_dir()  # by default eval reads and fills the run's training cache


def test_eval_cli_stage1_caption_is_one_line_error(stage1_run, data, capsys):
    rc = main(["eval", str(stage1_run), "--data", str(data), "--task", "caption"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # library warnings may come before it
    assert rc == 1 and last.startswith("qvlm eval: error:") and "stage-1" in last


def _fake_metrics(run: Path) -> None:
    lines = [{"stage": "stage1", "step": s, "loss": 3.0 / (s + 1)} for s in range(0, 50, 5)]
    lines += [{"stage": "stage1", "step": 50, "val_loss": 0.5}, "not json"]
    (run / "metrics.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()


def test_report_cli_writes_png_and_html(stage2_run, data, capsys):
    _fake_metrics(stage2_run)
    rc = main(["report", str(stage2_run), "--data", str(data), "--max-new-tokens", "2", "--json"])
    assert rc == 0
    paths = {k: Path(v) for k, v in json.loads(capsys.readouterr().out.strip().splitlines()[-1]).items()}
    assert set(paths) == {"loss", "similarity", "attention", "gallery", "word_attention"}
    assert all(p.parent == stage2_run / "report" for p in paths.values())
    for name in ("loss", "similarity", "attention", "word_attention"):
        _assert_png(paths[name])
    assert paths["word_attention"].name == "word_attention.png"
    with Image.open(paths["word_attention"]) as figure:  # 4 rows (n_attention): image, words x queries, share
        assert figure.height > 4 * 100
    page = paths["gallery"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('class="card') == N_IMAGES and "what color is it?" in page


def test_write_report_stage1_has_no_gallery(models, stage1_run, data, tmp_path):
    records, _ = load_records(data)
    paths = write_report(models[0], stage1_run, records, out_dir=tmp_path / "rep", n_grid=3)
    assert set(paths) == {"similarity", "attention"}  # no metrics.jsonl; no LM: no gallery, no word_attention
    _assert_png(paths["similarity"])
    with Image.open(paths["attention"]) as figure:  # 4 rows of image, mean and the tiny preset's 4 queries
        assert figure.width > 6 * 100 and figure.height > 4 * 100


def test_retrieval_caption_matching_counts_equal_captions_as_correct(models, tmp_path):
    # Every image has the same caption: with match="caption" every pair is correct (R@1 = 1 both ways);
    # with match="image" the identical texts tie, and ties count against a hit.
    rng = np.random.default_rng(1)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "a Red  square"}))
        lines.append(json.dumps({"image": f"{i}.png", "caption": "a red square"}))
    (tmp_path / "same.jsonl").write_text("\n".join(lines) + "\n")
    records, _ = load_records(tmp_path / "same.jsonl")
    stage1, _ = models
    by_caption = evaluate_retrieval(stage1, records, itm=False, match="caption")
    assert by_caption["i2t_r1"] == 1.0 and by_caption["t2i_r1"] == 1.0
    by_image = evaluate_retrieval(stage1, records, itm=False, match="image")
    assert by_image["t2i_r1"] < 1.0
