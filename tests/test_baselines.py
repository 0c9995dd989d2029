"""Baselines of `qvlm eval --baseline` (qvlm.eval.baselines) on synthetic data with known answers."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvlm.cli.main import main
from qvlm.data.records import Record
from qvlm.eval.baselines import (
    RIDGE_ALPHAS,
    _ridge_similarity,
    chance_recall,
    fit_linear_map,
    load_text_encoder,
    nearest_neighbours,
    prior_baseline,
    run_baselines,
    sentence_embeddings,
)
from qvlm.eval.evaluate import load_records, retrieval_positives
from qvlm.eval.metrics import caption_scores, recall_at_k

N_TRAIN = 8
COPIED = (2, 5)  # training images whose exact copies are in the test set


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """train.jsonl: 8 random images "thing i"; test.jsonl: 2 new images + copies of training images 2 and 5."""
    root = tmp_path_factory.mktemp("baselines")
    rng = np.random.default_rng(0)
    for i in range(N_TRAIN + 2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for i in COPIED:
        shutil.copy(root / f"{i}.png", root / f"copy_{i}.png")
    train = [{"image": f"{i}.png", "caption": f"thing {i}"} for i in range(N_TRAIN)]
    test = [{"image": f"{i}.png", "caption": f"new picture {i}"} for i in (N_TRAIN, N_TRAIN + 1)]
    test += [{"image": f"copy_{i}.png", "caption": f"a copy of thing {i}"} for i in COPIED]
    for name, rows in (("train", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl", root / "test.jsonl"


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory) -> Path:
    from qvlm.config import get_preset
    from qvlm.models.vlm import QVLM

    run = tmp_path_factory.mktemp("runs") / "s2"
    QVLM.build(get_preset("tiny"), stage=2).save_pretrained(run / "model")
    return run


@pytest.fixture(scope="module")
def model(stage2_run):
    from qvlm.models.vlm import QVLM

    return QVLM.from_pretrained(stage2_run)


def _miss(n: int, p: int, k: int) -> float:
    """Probability that none of p positives is among k of n candidates drawn at random."""
    return math.comb(n - p, k) / math.comb(n, k) if k <= n else 0.0


def test_chance_is_k_over_n_with_one_caption_per_image():
    out = chance_recall(np.eye(20, dtype=bool))
    for d in ("i2t", "t2i"):
        assert out[f"{d}_r1"] == pytest.approx(1 / 20)
        assert out[f"{d}_r5"] == pytest.approx(5 / 20)
        assert out[f"{d}_r10"] == pytest.approx(10 / 20)
    assert chance_recall(np.eye(4, dtype=bool))["i2t_r10"] == 1.0  # K beyond the candidates: always a hit


def test_chance_counts_repeated_captions_as_match_says():
    captions = [["a red square", "red square"], ["a red square"], ["a blue circle"], ["a green one"],
                ["a blue circle"], ["thing"]]
    n_images, n_texts = 6, 7
    by_image = chance_recall(retrieval_positives(captions, "image"))
    # image 0 owns 2 of the 7 texts, every other image 1; each text has one image
    expected = (1 - _miss(n_texts, 2, 5) + sum(1 - _miss(n_texts, 1, 5) for _ in range(5))) / n_images
    assert by_image["i2t_r5"] == pytest.approx(expected)
    assert by_image["t2i_r1"] == pytest.approx(1 / n_images)
    by_caption = chance_recall(retrieval_positives(captions, "caption"))
    # "a red square" belongs to images 0 and 1, "a blue circle" to images 2 and 4
    t2i = [2, 1, 2, 2, 1, 2, 1]  # positives per text column
    assert by_caption["t2i_r1"] == pytest.approx(np.mean([1 - _miss(n_images, p, 1) for p in t2i]))
    assert by_caption["t2i_r1"] > by_image["t2i_r1"]


def test_ridge_recovers_an_exact_linear_map():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 6, generator=gen), torch.randn(6, generator=gen)
    x, x_test = torch.randn(120, 12, generator=gen), torch.randn(30, 12, generator=gen)
    captions = [[f"caption {i}"] for i in range(120)]
    solver, alpha, val_scores = fit_linear_map(x, captions, x @ a + b, alphas=(1e-9, 1.0, 100.0))
    assert set(val_scores) == {1e-9, 1.0, 100.0} and alpha == 1e-9  # noiseless: the least shrinkage wins
    assert torch.allclose(solver.weight(alpha).float(), a, atol=1e-4)
    assert torch.allclose(solver.y_mean.float(), (x @ a + b).mean(0), atol=1e-5)
    sim = _ridge_similarity(solver, alpha, x_test, x_test @ a + b)
    out = recall_at_k(sim, np.eye(30, dtype=bool))
    assert out["i2t_r1"] == 1.0 and out["t2i_r1"] == 1.0


def test_ridge_strength_shrinks_on_noisy_data():
    # 176 input dims and 180 fitting images with heavy noise: least squares has almost no residual
    # degrees of freedom and overfits, so the validation split must pick a clearly stronger ridge.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 176, generator=gen)
    y = x @ torch.randn(176, 16, generator=gen) + 20 * torch.randn(200, 16, generator=gen)
    _, alpha, scores = fit_linear_map(x, [[str(i)] for i in range(200)], y)
    assert set(scores) == set(RIDGE_ALPHAS) and scores[alpha] == max(scores.values())
    assert alpha >= 0.1 and scores[alpha] > scores[min(RIDGE_ALPHAS)] + 0.1


def test_nearest_neighbours_by_cosine():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = torch.tensor([[5.0, 0.1], [0.2, 3.0], [2.0, 2.1]])  # scale does not matter, direction does
    assert nearest_neighbours(query, gallery).tolist() == [0, 1, 2]


def test_sentence_embeddings_ignore_padding(model):
    encoder = load_text_encoder(model)
    texts = ["a cat", "a much longer sentence about a dog on the grass"]
    alone = sentence_embeddings(encoder, model.text_tokenizer, texts[:1], max_len=24)
    batched = sentence_embeddings(encoder, model.text_tokenizer, texts, max_len=24)
    assert batched.shape == (2, 32)  # the tiny text encoder's width
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2))


def test_nearest_and_blind_captions(model, data, tmp_path):
    train, test = data
    records, _ = load_records(test)
    results, predictions = run_baselines(model, records, ["nearest", "blind"], "caption", train=train,
                                         cache=tmp_path / "cache", batch_size=4, max_new_tokens=3)
    by_image = {Path(p["image"]).name: p for p in predictions["nearest"]}
    for i in COPIED:  # an identical training image is the nearest: its caption is the prediction
        assert by_image[f"copy_{i}.png"]["prediction"] == f"thing {i}"
        assert by_image[f"copy_{i}.png"]["neighbour"].endswith(f"/{i}.png")
    assert results["nearest"]["n"] == 4 and results["nearest"]["test_images_in_train"] == len(COPIED)
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    caption = model.caption([grey], max_new_tokens=3)[0]
    assert results["blind"]["caption"] == caption
    refs = {p["key"]: p["references"] for p in predictions["nearest"]}
    assert results["blind"]["cider"] == caption_scores({k: caption for k in refs}, refs)["cider"]


def test_eval_cli_retrieval_baselines(stage2_run, data, tmp_path, capsys):
    train, test = data
    out = tmp_path / "retrieval.json"
    rc = main(["eval", str(stage2_run), "--data", str(test), "--task", "retrieval", "--json-out", str(out),
               "--baseline", "chance", "--baseline", "linear", "--train", str(train), "--batch-size", "4"])
    assert rc == 0
    result = json.loads(out.read_text())
    chance, linear = result["baselines"]["chance"], result["baselines"]["linear"]
    assert (chance["i2t_r1"], chance["t2i_r1"], chance["i2t_r5"]) == (0.25, 0.25, 1.0)  # 4 test images
    assert linear["ridge_alpha"] in RIDGE_ALPHAS and linear["n_train_images"] == N_TRAIN
    assert (linear["n_images"], linear["n_texts"]) == (result["n_images"], result["n_texts"]) == (4, 4)
    assert all(0.0 <= linear[f"{d}_r{k}"] <= 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert linear["test_images_in_train"] == len(COPIED) and "test_images_in_train" not in chance
    table = capsys.readouterr().out
    assert "run (ITC)" in table and "chance" in table and "linear (ridge alpha" in table
    assert f"warning: {len(COPIED)} test image(s) are also in --train" in table


def test_eval_cli_caption_baselines(stage2_run, data, tmp_path, capsys):
    train, test = data
    out = tmp_path / "caption.json"
    rc = main(["eval", str(stage2_run), "--data", str(test), "--task", "caption", "--json-out", str(out),
               "--baseline", "nearest", "--baseline", "blind", "--train", str(train), "--max-new-tokens", "3",
               "--json"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"bleu4", "rouge_l", "cider", "n"} <= set(result["baselines"]["nearest"])
    assert len(result["baseline_predictions"]["nearest"]) == result["n"] == 4
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "baselines" in printed and "baseline_predictions" not in printed and "predictions" not in printed


def _question(q: str, answer: str, kind: str) -> Record:
    return Record(key=q, image_path="/x.png", question=q, answers=[answer], answer_type=kind)


def test_prior_answers_by_question_then_type_then_overall():
    train = [_question("Is there a red shape?", "no", "yes/no")] * 3 + [_question("is there a red shape", "yes", "yes/no")]
    train += [_question("Is there not a circle?", "yes", "yes/no"), _question("What colour?", "red", "color")] * 2
    train += [_question("What colour?", "blue", "color")]
    test = [_question("is there a RED shape?", "no", "yes/no"),  # normalised as answers are: seen, "no"
            _question("Is there not a circle?", "no", "yes/no"),  # seen, "yes": wrong
            _question("Is there a blue shape?", "yes", "yes/no"),  # unseen: its type's most common, "no"
            _question("What colour?", "red", "color"),
            _question("How many?", "2", None)]  # unseen, no type: all questions' most common, "no"
    result, predictions = prior_baseline(train, test)
    assert [p["prediction"] for p in predictions] == ["no", "yes", "no", "red", "no"]
    assert result["exact_match"] == 2 / 5 and result["unseen_questions"] == 2
    assert result["per_type"]["yes/no"]["exact_match"] == 1 / 3 and result["per_type"]["color"]["exact_match"] == 1
    assert prior_baseline(train, test, limit=2)[0]["n"] == 2


def test_eval_cli_vqa_prior_baseline(stage2_run, tmp_path, capsys):
    image = tmp_path / "0.png"
    Image.new("RGB", (32, 32), (200, 0, 0)).save(image)
    rows = {"train": [("is it red?", "yes")] * 3 + [("is it red?", "no")], "test": [("is it red?", "yes"), ("is it red?", "no")]}
    for name, qa in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"image": "0.png", "question": q, "answers": [a], "answer_type": "yes/no"}) + "\n" for q, a in qa))
    out = tmp_path / "vqa.json"
    rc = main(["eval", str(stage2_run), "--data", str(tmp_path / "test.jsonl"), "--task", "vqa", "--json-out", str(out),
               "--baseline", "prior", "--train", str(tmp_path / "train.jsonl"), "--max-new-tokens", "2"])
    assert rc == 0
    prior = json.loads(out.read_text())["baselines"]["prior"]
    assert (prior["n"], prior["exact_match"], prior["per_type"]["yes/no"]["exact_match"]) == (2, 0.5, 0.5)
    table = capsys.readouterr().out
    assert "prior" in table and "yes/no" in table and "50.0" in table


@pytest.mark.parametrize("args, message", [
    (["--task", "retrieval", "--baseline", "linear"], "--train"),
    (["--task", "retrieval", "--baseline", "nearest", "--train", "x.jsonl"], "--task caption"),
    (["--task", "caption", "--baseline", "ridge"], "unknown baseline"),
    (["--task", "vqa", "--baseline", "blind"], "with --task vqa use prior"),
    (["--task", "vqa", "--baseline", "prior"], "--train"),
])
def test_eval_cli_baseline_errors_are_one_line(args, message, stage2_run, data, capsys):
    rc = main(["eval", str(stage2_run), "--data", str(data[1]), *args])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("qvlm eval: error:") and message in last
