"""Metric functions against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from qvlm.eval.metrics import (
    caption_scores,
    exact_match,
    normalize_answer,
    positives_from_groups,
    ptb_tokenize,
    recall_at_k,
    vqa_scores,
    vqa_soft_accuracy,
)

# ------------------------------------------------------------------ retrieval


def _crafted() -> tuple[np.ndarray, np.ndarray]:
    """3 images x 4 texts; image 0 has texts 0 and 1, image 1 text 2, image 2 text 3."""
    sim = np.array(
        [
            #  t0    t1    t2    t3
            [0.1, 0.8, 0.9, 0.0],  # img0: best positive t1 (0.8); negatives >= 0.8: t2 -> rank 1
            [0.7, 0.2, 0.3, 0.6],  # img1: positive t2 (0.3); negatives >= 0.3: t0, t3 -> rank 2
            [0.2, 0.1, 0.4, 0.5],  # img2: positive t3 (0.5); none >= 0.5 -> rank 0
        ]
    )
    pos = positives_from_groups(["a", "a", "b", "c"], ["a", "b", "c"])
    return sim, pos


def test_positives_from_groups():
    _, pos = _crafted()
    assert pos.tolist() == [
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    with pytest.raises(ValueError):
        positives_from_groups(["zz"], ["a"])


def test_recall_at_k_crafted_matrix():
    sim, pos = _crafted()
    r = recall_at_k(sim, pos, ks=(1, 2, 3))
    # i2t ranks [1, 2, 0]: R@1 = 1/3, R@2 = 2/3, R@3 = 1.
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == pytest.approx(1.0)
    # t2i, per column (image scores), positive image in brackets:
    #   t0 [img0 0.1]: img1 0.7, img2 0.2 above -> rank 2
    #   t1 [img0 0.8]: nothing above          -> rank 0
    #   t2 [img1 0.3]: img0 0.9, img2 0.4     -> rank 2
    #   t3 [img2 0.5]: img1 0.6               -> rank 1
    # R@1 = 1/4, R@2 = 2/4, R@3 = 4/4.
    assert r["t2i_r1"] == pytest.approx(0.25)
    assert r["t2i_r2"] == pytest.approx(0.5)
    assert r["t2i_r3"] == pytest.approx(1.0)
    assert r["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 0.25 + 0.5 + 1) / 6)
    assert (r["n_images"], r["n_texts"]) == (3, 4)


def test_recall_at_k_default_keys_and_tensor_input():
    sim, pos = _crafted()
    r = recall_at_k(torch.tensor(sim, dtype=torch.bfloat16), torch.tensor(pos))
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall"} <= set(r)
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(0.25)
    assert r["i2t_r5"] == 1.0 and r["t2i_r10"] == 1.0  # k beyond the candidate count


def test_recall_ties_count_against_the_model():
    # A collapsed model (all scores equal, or NaN) must not get a perfect score.
    pos = np.eye(4, dtype=bool)
    for sim in (np.ones((4, 4)), np.full((4, 4), np.nan)):
        r = recall_at_k(sim, pos, ks=(1, 4))
        assert r["i2t_r1"] == 0.0 and r["t2i_r1"] == 0.0
        assert r["i2t_r4"] == 1.0  # 3 negatives tie -> rank 3 < 4


def test_recall_identity_is_perfect_and_bad_input_raises():
    r = recall_at_k(np.eye(5), np.eye(5, dtype=bool))
    assert r["mean_recall"] == 1.0
    with pytest.raises(ValueError):
        recall_at_k(np.eye(3), np.eye(2, dtype=bool))
    with pytest.raises(ValueError):  # an image without any caption
        recall_at_k(np.eye(2), np.array([[True, True], [False, False]]))


# ------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, period stripped, lower-cased
        ("yes!", "yes"),  # "!" not next to a space -> replaced by a space, then stripped
        ("the cat", "cat"),  # article removed
        ("An apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("isnt it", "isn't it"),
        ("Im", "im"),  # keys are matched after lower-casing, so the table's "Im" entry never applies
        ("none", "0"),
        ("2.5", "2.5"),  # a period followed by a digit stays
        ("1,000", "1000"),  # digit,digit -> every listed mark is deleted, not spaced
        ("black/white", "black white"),
        ("red, white", "red white"),  # ", " -> deleted
        ("  ten\n", "10"),
        ("somebody'd", "somebodyd"),  # the official table's own (reversed) entry, kept verbatim
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_soft_accuracy_worked_10_answer_example():
    answers = ["cat", "cat"] + ["dog"] * 8
    # Leave out one of the 2 "cat": 1 match left -> 1/3 (2 such subsets).
    # Leave out one of the 8 "dog": 2 matches left -> 2/3 (8 such subsets).
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 0.6   (not min(2/3, 1) = 0.667)
    assert vqa_soft_accuracy("Cat.", answers) == pytest.approx(0.6)
    # 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9; 4 matches: every subset keeps >= 3 -> 1.0
    assert vqa_soft_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_soft_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_soft_accuracy("cat", ["cat"] * 1 + ["dog"] * 9) == pytest.approx(0.3)  # 9*(1/3)/10
    assert vqa_soft_accuracy("bird", answers) == 0.0


def test_vqa_soft_accuracy_few_answers_rule():
    assert vqa_soft_accuracy("Two", "2") == 1.0  # single answer: exact match after normalisation
    assert vqa_soft_accuracy("three", ["2"]) == 0.0
    assert vqa_soft_accuracy("blue", ["blue", "blue", "navy"]) == pytest.approx(2 / 3)  # fraction


def test_exact_match_uses_majority_answer():
    assert exact_match("The Circle", "circle") == 1.0
    assert exact_match("red", ["red", "blue", "blue"]) == 0.0  # majority is "blue"
    assert exact_match("blue", ["red", "blue", "blue"]) == 1.0


def test_vqa_scores_breakdown():
    preds = ["yes", "red", "circle", "no"]
    answers = ["yes", "blue", "circle", ["no"] * 2 + ["yes"] * 8]
    types = ["yes/no", "color", "shape", "yes/no"]
    s = vqa_scores(preds, answers, types)
    # exact: 1, 0, 1, 0 (majority "yes") -> 0.5. soft: 1, 0, 1, 0.6 -> 2.6 / 4 = 0.65
    assert s["n"] == 4
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["soft_accuracy"] == pytest.approx(0.65)
    assert s["per_type"]["yes/no"] == {"n": 2, "exact_match": 0.5, "soft_accuracy": pytest.approx(0.8)}
    assert s["per_type"]["color"]["exact_match"] == 0.0
    assert s["per_type"]["shape"] == {"n": 1, "exact_match": 1.0, "soft_accuracy": 1.0}
    assert vqa_scores(preds, answers)["per_type"] == {}
    with pytest.raises(ValueError):
        vqa_scores(preds, answers[:2])


# ------------------------------------------------------------------ captions

# Plain-English captions of the kind models and annotators write, with the usual punctuation.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs, playing in the snow!",
    "A woman's hand holding a cell phone.",
    "The cat isn't sitting on the couch; it's on the floor.",
    'A sign that says "STOP" near a road.',
    "A black-and-white photo of a 3.5 m tall giraffe...",
    "People standing around a table (with food) at 10:30.",
    "a red circle",
    "Is this a bus? Yes -- it's a double-decker bus.",
    "A group of kids' bikes parked by the U.S. post office.",
    "A plate with 1,000 tiny sprinkles & a donut",
    "a man 's hat",
    "Mr. Smith walks his dog down Main St. at night",
    "There are 2 cats: one black, one white.",
    "The sign says no.",
    "I'm sure we're looking at a train they'll board, won't they?",
]


def test_ptb_tokenize_examples():
    assert ptb_tokenize("A dog's ball, on the grass.") == "a dog 's ball on the grass"
    assert ptb_tokenize("Don't stop!") == "do n't stop"
    assert ptb_tokenize("A (small) dog") == "a -lrb- small -rrb- dog"  # bracket names survive, as in COCO
    assert ptb_tokenize("3.5 m, 1,000 people") == "3.5 m 1,000 people"
    assert ptb_tokenize("") == ""


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for the reference PTBTokenizer")
def test_ptb_tokenize_matches_stanford_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ref = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
    for i, c in enumerate(CAPTIONS):
        assert ptb_tokenize(c) == ref[i][0], c


def _direct_scores(gts: dict, res: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    return {
        "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }


def test_caption_scores_equal_pycocoevalcap_on_pretokenised_input():
    refs = {
        1: ["a man riding a wave on a surfboard", "a surfer rides a big wave"],
        2: ["two dogs play in the snow", "a pair of dogs running through snow"],
        3: ["a red circle on a white background"],
        4: ["a plate of food with broccoli and rice", "a meal on a white plate"],
    }
    preds = {
        1: "a man riding a wave",
        2: "two dogs running in the snow",
        3: "a red circle",
        4: "a plate of rice",
    }
    ours = caption_scores(preds, refs)
    direct = _direct_scores(refs, {k: [v] for k, v in preds.items()})
    for key in ("bleu4", "rouge_l", "cider"):
        assert ours[key] == pytest.approx(direct[key], abs=1e-12), key
    assert ours["n"] == 4
    # and the tokenisation is applied: punctuation / case changes nothing here
    noisy = {k: v.capitalize() + "." for k, v in preds.items()}
    assert caption_scores(noisy, refs)["cider"] == pytest.approx(ours["cider"])


def test_caption_scores_identical_captions():
    caps = {
        1: "a dog runs on the beach",
        2: "a red bus parked near a building",
        3: "two cats sleeping together",
    }
    s = caption_scores(caps, {k: [v] for k, v in caps.items()})
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D: every n-gram occurs in one image only, so each has IDF log(3) > 0; hypothesis vector
    # == reference vector -> cosine 1 for n = 1..4, no length penalty -> 10 * mean(1,1,1,1) = 10.
    assert s["cider"] == pytest.approx(10.0)


def test_bleu4_brevity_penalty_by_hand():
    refs = {1: ["a small brown dog runs on the grass"], 2: ["x y z w v u t s"]}
    preds = {1: "a small brown dog runs on", 2: "x y z w v u"}
    # Every n-gram of each hypothesis is in its reference: precisions 1, 1, 1, 1.
    # Corpus lengths: hypothesis 6 + 6 = 12, reference 8 + 8 = 16 -> BP = exp(1 - 16/12) = exp(-1/3).
    assert caption_scores(preds, refs)["bleu4"] == pytest.approx(math.exp(-1 / 3), rel=1e-6)


def test_bleu4_precision_by_hand():
    refs = {1: ["the cat sat on the mat"], 2: ["a b c d e f"]}
    preds = {1: "the cat sat on a mat", 2: "a b c d e f"}
    # Lengths equal (12 vs 12) -> BP = 1. Clipped matches / guesses, summed over both:
    #   1-grams: (5 + 6) / 12, 2-grams: (3 + 5) / 10, 3-grams: (2 + 4) / 8, 4-grams: (1 + 3) / 6
    p = [11 / 12, 8 / 10, 6 / 8, 4 / 6]
    assert caption_scores(preds, refs)["bleu4"] == pytest.approx(math.prod(p) ** 0.25, rel=1e-6)


def test_distinct_counts_different_captions_after_tokenising():
    refs = {k: ["a cat"] for k in range(4)}
    assert caption_scores({0: "A cat.", 1: "a cat", 2: "a dog", 3: "a bird"}, refs)["distinct"] == 3 / 4
    assert caption_scores({k: "a cat" for k in range(4)}, refs)["distinct"] == 1 / 4


def test_caption_scores_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError):
        caption_scores({1: "a"}, {1: []})
