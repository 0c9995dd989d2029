"""The training recipe, exactly (issue 16): accumulation, weight decay, temperature, truncation,
stage-2 validation metrics and the best checkpoint."""

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import read_metrics, write_shapes_dataset

from qvlm.cli.main import main
from qvlm.config import ConfigError, get_preset
from qvlm.data.cache import FeatureCache
from qvlm.data.collate import Stage2Collator
from qvlm.data.datasets import InstructionDataset
from qvlm.data.records import read_records
from qvlm.errors import QVLMError
from qvlm.models.objectives import ObjectiveOutput, Stage1Objective
from qvlm.models.processing import build_stage2_batch, truncated_answers
from qvlm.models.vlm import QVLM
from qvlm.train import stages, trainer
from qvlm.train.optim import stage1_param_groups, stage2_param_groups

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest.py


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """40 training images (a caption and a colour question each), 8 validation images."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"))


# -- gradient accumulation ----------------------------------------------------------------------------

def test_accumulation_never_spans_an_epoch_and_weights_the_remainder_step(shapes, tmp_path, monkeypatch):
    """40 captions / batch 8 = 5 micro-batches an epoch, grad_accum 2: steps of 2, 2 and 1 micro-batches
    each epoch. The loss is replaced by sum(query_tokens), whose gradient is 1 per element for every
    micro-batch, so a step that averages its micro-batches sees exactly 1; a micro-batch leaking into
    the next epoch's first step, or a remainder divided by grad_accum, shows as 1.5 or 0.5."""
    grads = []

    def build_optimizer(groups, stage_cfg, **kwargs):
        optimizer = torch.optim.SGD(groups, lr=0.0)  # the weights stay; only the gradients matter
        optimizer.register_step_pre_hook(
            lambda opt, *_: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]
                                          if p.grad is not None]))
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)
    monkeypatch.setattr(Stage1Objective, "forward", lambda self, features, captions, image_keys:
                        ObjectiveOutput.weighted({"itc": self.qformer.query_tokens.sum()}, {"itc": 1.0}))
    config = get_preset("tiny").override(["stage1.grad_accum=2", "stage1.epochs=2", "stage1.grad_clip=0"])
    trainer.train(config, 1, str(shapes[0]), tmp_path / "run")
    assert len(grads) == 6  # 3 steps an epoch
    for step in grads:
        (grad,) = step  # only the query tokens are in the loss
        assert torch.allclose(grad, torch.ones_like(grad)), grad.flatten()[0]


def test_accumulation_plan_at_the_paper_sizes():
    """45,000 pairs / batch 8 = 5,625 micro-batches; with grad_accum 4 the last one is a step alone."""
    plan = [trainer._accumulation(i, 5625, 4) for i in range(1, 5626)]
    ends = [i for i, (_, end) in enumerate(plan, 1) if end]
    assert len(ends) == 1407 and ends[-2:] == [5624, 5625]
    assert plan[-1] == (1, True) and plan[-2] == (4, True) and plan[0] == (4, False)


# -- weight decay -------------------------------------------------------------------------------------

def _decay_of(model, groups) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("stage", [1, 2])
def test_weight_decay_goes_to_matrices_only(stage, tiny_config):
    config = tiny_config.override([f"stage{stage}.weight_decay=0.1"])
    model = QVLM.build(config, stage=stage)
    groups = (stage1_param_groups if stage == 1 else stage2_param_groups)(model, config)
    decay = _decay_of(model, groups)
    named = dict(model.named_parameters())
    assert decay, "no trainable parameters in the groups"
    for name, p in named.items():
        if id(p) not in decay:
            continue
        excepted = any(k in name for k in ("query_tokens", "embedding", "log_inv_temp"))
        assert decay[id(p)] == (0.1 if p.ndim >= 2 and not excepted else 0.0), name
    # The LayerNorm inside itg_transform has no "norm" in its name: rank decides, not the name.
    assert decay[id(model.qformer.itg_transform[2].weight)] == 0.0
    assert decay[id(model.qformer.itg_transform[0].weight)] == 0.1
    assert decay[id(model.qformer.query_tokens)] == 0.0
    if stage == 2:
        lora = [p for n, p in named.items() if "lora_A" in n]
        assert lora and all(decay[id(p)] == 0.1 for p in lora)


# -- temperature --------------------------------------------------------------------------------------

def test_fixed_temperature_out_of_range_is_refused(tiny_config):
    config = tiny_config.override(["qformer.temperature=0.7"])
    with pytest.raises(ConfigError, match=r"qformer.temperature=0.7 .*\[0.001, 0.5\].*learn_temperature"):
        QVLM.build(config, stage=1)


def test_only_a_learned_temperature_is_clamped(tiny_config):
    fixed = QVLM.build(tiny_config.override(["qformer.temperature=0.3"]), stage=1).qformer
    assert fixed.inv_temperature.item() == pytest.approx(1 / 0.3)
    learned = QVLM.build(tiny_config.override(["qformer.temperature=0.7", "qformer.learn_temperature=true"]),
                         stage=1).qformer
    assert learned.inv_temperature.item() == pytest.approx(2.0)  # 1 / 0.5, BLIP-2's bound


# -- truncated answers --------------------------------------------------------------------------------

def test_a_cut_answer_ends_without_eos_and_is_counted():
    tok = QVLM.build(get_preset("tiny"), stage=2).tokenizer
    long, short = "a long red square", "red"
    cap = len(tok(short, add_special_tokens=False).input_ids)  # "red" fits exactly, the other is cut
    batch = build_stage2_batch(tok, ["q1", "q2"], [long, short], num_queries=2, max_answer_tokens=cap)
    labelled = [row[row != -100].tolist() for row in batch["labels"]]
    assert labelled[0] == tok(long, add_special_tokens=False).input_ids[:cap]  # no EOS
    assert labelled[1] == tok(short, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert truncated_answers(batch["labels"], tok.eos_token_id) == 1


# -- stage-2 validation metrics and the best checkpoint -----------------------------------------------

class _Echo:
    """Stands in for a model: generates each batch's own target answers, or one wrong text."""

    def __init__(self, config, perfect: bool):
        self.config, self.perfect, self.targets = config, perfect, []

    def collate(self, collate):
        def run(items):
            batch = collate(items)
            self.targets = batch["answers"]
            return batch
        return run

    def generate_from_features(self, features, prompts, max_new_tokens, **decoding):
        return list(self.targets) if self.perfect else ["nothing at all"] * len(prompts)


def _validation_data(shapes, tmp_path, tiny_config):
    """The shapes validation split from the feature cache, and its stage-2 collator."""
    model = QVLM.build(tiny_config, stage=2)
    cache = FeatureCache(tmp_path / "features", model.vision)
    records = list(read_records(str(shapes[1])))
    cache.build(records, progress=False)
    collate = Stage2Collator(model.tokenizer, tiny_config.qformer.num_queries, max_answer_tokens=16)
    return InstructionDataset(records, cache=cache), collate


def test_stage2_generation_scores_vqa_by_accuracy_and_captions_by_captionread_metrics(shapes, tmp_path, tiny_config):
    val_set, collate = _validation_data(shapes, tmp_path, tiny_config)
    scores = {}
    for perfect in (True, False):
        echo = _Echo(tiny_config, perfect)
        scores[perfect] = stages._generation_scores(echo, val_set, echo.collate(collate), batch_size=4,
                                                     device="cpu", batches=4)
    assert set(scores[True]) == {"val_vqa_accuracy", "val_caption_cider", "val_caption_bleu4"}
    assert scores[True]["val_vqa_accuracy"] == 1.0 and scores[False]["val_vqa_accuracy"] == 0.0
    assert scores[True]["val_caption_cider"] > 1.0 and scores[False]["val_caption_cider"] == 0.0


def test_without_caption_metrics_captions_are_validated_by_loss_only(shapes, tmp_path, tiny_config, monkeypatch):
    """pycocoevalcap is an extra (qvlm[eval]): training must not need it."""
    monkeypatch.setattr(stages, "has_caption_metrics", lambda: False)
    val_set, collate = _validation_data(shapes, tmp_path, tiny_config)
    echo = _Echo(tiny_config, perfect=True)
    scores = stages._generation_scores(echo, val_set, echo.collate(collate), batch_size=4, device="cpu",
                                        batches=4)
    assert scores == {"val_vqa_accuracy": 1.0}


@pytest.fixture(scope="module")
def stage2_run(shapes, tmp_path_factory):
    """20 steps of stage 2 from scratch, validated every 5, answers capped at 4 tokens, best by val_loss."""
    out = tmp_path_factory.mktemp("runs") / "s2"
    args = ["train", "stage2", "--preset", "tiny", "--data", str(shapes[0]), "--val", str(shapes[1]),
            "--out", str(out), "--set", "train.eval_every=5", "--set", "stage2.max_answer_tokens=4",
            "--set", "train.keep_best=val_loss"]
    assert main(args) == 0
    return out


def test_stage2_logs_each_validation_metric_under_its_own_name(stage2_run):
    val = [m for m in read_metrics(stage2_run) if "val_loss" in m]
    assert [m["step"] for m in val] == [5, 10, 15, 20]
    for m in val:
        assert {"val_vqa_accuracy", "val_caption_cider", "val_caption_bleu4"} <= set(m)
        assert "val_accuracy" not in m
        assert 0 <= m["val_vqa_accuracy"] <= 1 and m["val_caption_cider"] >= 0


def test_stage2_reports_how_many_answers_were_cut(stage2_run, shapes):
    tok = QVLM.from_pretrained(stage2_run).tokenizer
    answers = [r.get("caption") or r["answer"] for r in map(json.loads, shapes[0].read_text().splitlines())]
    expected = sum(len(tok(a, add_special_tokens=False).input_ids) > 4 for a in answers)
    (report,) = [m for m in read_metrics(stage2_run) if "truncated_answers" in m]
    assert report["answers"] == len(answers) and 0 < expected < len(answers)
    assert report["truncated_answers"] == expected


class _Words:
    """A tokenizer of one token per word."""

    def __call__(self, texts, add_special_tokens=True):
        return SimpleNamespace(input_ids=[text.split() for text in texts])


def test_stage2_says_before_training_what_the_answer_cap_cuts_and_which_cap_keeps_99_percent():
    answers = ["a"] * 90 + ["a b c d e f"] * 10  # 1 token at the median, 6 at the 99th percentile
    counts = stages.answer_token_counts(answers, _Words())
    assert stages.answer_lengths(counts, 4) == (
        "answers: 1 tokens at the median, 6 at the 99th percentile, 6 the longest; stage2.max_answer_tokens=4 "
        "cuts 10 of 100 (10.0%), trained without their EOS; --set stage2.max_answer_tokens=6 keeps 99% whole")
    assert stages.answer_lengths(counts, 8).endswith("max_answer_tokens=8: none cut")
    assert stages.answer_lengths(counts, None).endswith("max_answer_tokens=None: none cut")


def test_auto_epochs_and_answer_cap_come_from_the_data_are_printed_and_saved(shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(stages.AUTO_EPOCH_SAMPLES, 2, 150)  # 80 training samples: 150 / 80 -> 2 epochs
    out = tmp_path / "run"
    assert main(["train", "stage2", "--preset", "tiny", "--data", str(shapes[0]), "--out", str(out),
                 "--set", "stage2.epochs=auto", "--set", "stage2.max_answer_tokens=auto"]) == 0
    model = QVLM.from_pretrained(out)
    answers = [r.get("caption") or r["answer"] for r in map(json.loads, shapes[0].read_text().splitlines())]
    counts = sorted(len(model.tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
    cap = counts[math.ceil(0.99 * len(counts)) - 1]  # nearest rank
    assert counts[0] < cap  # the data has answers of different lengths, so the choice is visible
    printed = capsys.readouterr().out
    assert "stage2.epochs=auto: 2 epoch(s) of 80 samples (about 150 samples seen)" in printed
    assert f"stage2.max_answer_tokens=auto: {cap} tokens keep 99% of the training answers whole" in printed
    assert (model.config.stage2.epochs, model.config.stage2.max_answer_tokens) == (2, cap)  # saved as chosen
    assert max(m["step"] for m in read_metrics(out) if "step" in m) == 2 * 80 // 4  # batch 4: 20 steps an epoch


def test_describe_first_says_before_training_how_many_questions_train_behind_a_caption(shapes, tmp_path, capsys):
    assert main(["train", "stage2", "--preset", "tiny", "--data", str(shapes[0]), "--out", str(tmp_path / "run"),
                 "--set", "lm.describe_first=true", "--set", "stage2.max_steps=1"]) == 0
    assert "lm.describe_first: 40 of 40 questions train behind a caption of their image" in capsys.readouterr().out


def test_auto_epochs_take_about_the_measured_samples_and_at_least_one_epoch():
    config, said = get_preset("tiny"), []
    printer = SimpleNamespace(print=said.append)
    config.stage1.epochs = config.stage2.epochs = "auto"
    stages._settle_epochs(config.stage1, 1, list(range(1_791)), printer)  # openclipart's training split
    stages._settle_epochs(config.stage2, 2, list(range(100_000)), printer)
    assert config.stage1.epochs == round(stages.AUTO_EPOCH_SAMPLES[1] / 1_791) and config.stage2.epochs == 1
    assert said[1] == "stage2.epochs=auto: 1 epoch(s) of 100,000 samples (about 16,000 samples seen)"


def test_keep_best_saves_the_lowest_val_loss_model_next_to_the_last(stage2_run, shapes, capsys):
    val = [m for m in read_metrics(stage2_run) if "val_loss" in m]
    best = min(val, key=lambda m: m["val_loss"])
    record = json.loads((stage2_run / "best" / "best.json").read_text())
    assert record == {"metric": "val_loss", "value": best["val_loss"], "step": best["step"]}
    assert (stage2_run / "model" / "model.safetensors").is_file()
    QVLM.from_pretrained(stage2_run / "best")
    image = shapes[0].parent / "imgs" / "0.png"
    assert main(["caption", str(stage2_run / "best"), str(image), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}:")


@pytest.mark.parametrize("metric", ["val_accuracy", "val_r1"])  # the old name; a stage-1 metric
def test_keep_best_refuses_a_metric_stage_2_does_not_report(metric, shapes, tmp_path):
    config = get_preset("tiny").override([f"train.keep_best={metric}"])
    with pytest.raises(QVLMError, match="no stage-2 validation metric; choose one of val_loss"):
        trainer.train(config, 2, str(shapes[0]), tmp_path / "run", val=str(shapes[1]))
    assert not (tmp_path / "run").exists()


def test_keep_best_on_a_caption_score_names_the_extra_when_pycocoevalcap_is_missing(shapes, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pycocoevalcap" else real(n, *a))
    config = get_preset("tiny").override(["train.keep_best=val_caption_cider"])
    with pytest.raises(QVLMError, match=r"keep_best='val_caption_cider' needs .*pycocoevalcap.*qvlm\[eval\]"):
        trainer.train(config, 2, str(shapes[0]), tmp_path / "run", val=str(shapes[1]))
    assert not (tmp_path / "run").exists()


def test_keep_best_needs_validation_data(shapes, tmp_path):
    config = get_preset("tiny").override(["train.keep_best=val_loss"])
    with pytest.raises(QVLMError, match="needs validation data: pass --val"):
        trainer.train(config, 1, str(shapes[0]), tmp_path / "run")
