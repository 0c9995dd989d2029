"""The self-contained core (issue 18): objectives next to the model, one output type, and models/
importing nothing from the training, data, evaluation or serving code."""

import ast
from pathlib import Path

import pytest
import torch

import qvlm
from qvlm.data.collate import Stage2Collator
from qvlm.models.objectives import ObjectiveOutput, Stage1Objective, Stage2Objective, positive_pairs
from qvlm.models.vlm import QVLM

MODELS = Path(qvlm.__file__).parent / "models"
OUTSIDE_THE_CORE = ("qvlm.train", "qvlm.data", "qvlm.eval", "qvlm.serve")


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports too), as absolute names;
    `from qvlm import train` counts as qvlm.train."""
    package = "qvlm.models"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against qvlm.models
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_import_scan_sees_every_form_of_import(tmp_path):
    """The scan below must not pass by missing an import form."""
    source = tmp_path / "m.py"
    source.write_text("import qvlm.train.optim\nfrom qvlm import data\nfrom ..eval import metrics\n"
                      "def f():\n    from qvlm.serve.app import create_app\n")
    found = _imported_modules(source)
    assert {"qvlm.train.optim", "qvlm.data", "qvlm.eval.metrics", "qvlm.serve.app"} <= found


def test_models_import_nothing_from_train_data_eval_or_serve():
    offending = {f"{path.name}: {name}" for path in sorted(MODELS.glob("*.py"))
                 for name in _imported_modules(path) if name.startswith(OUTSIDE_THE_CORE)}
    assert not offending, f"models/ must stay self-contained; move these out or pass values in: {offending}"


@pytest.fixture
def stage1(tiny_config):
    torch.manual_seed(0)
    config = tiny_config.override(["stage1.itc_weight=1.0", "stage1.itm_weight=0.5", "stage1.itg_weight=0.25"])
    model = QVLM.build(config, stage=1)
    return model, Stage1Objective(model, config).eval()  # eval: no dropout, so parts can be recomputed


def test_stage1_loss_is_the_weighted_sum_of_the_named_parts(stage1, tiny_images):
    model, objective = stage1
    features = model.encode_images(tiny_images[:4])
    captions, keys = ["a red cat", "two dogs", "A red  cat", "blue sky"], ["k0", "k1", "k2", "k3"]
    out = objective(features, captions, keys)
    assert isinstance(out, ObjectiveOutput)
    assert set(out.losses) == {"itc", "itm", "itg"} and out.weights == {"itc": 1.0, "itm": 0.5, "itg": 0.25}
    torch.testing.assert_close(out.loss, out.losses["itc"] + 0.5 * out.losses["itm"] + 0.25 * out.losses["itg"])
    assert set(out.scalars()) == {"loss", "itc", "itm", "itg", "r1"} and 0 <= out.metrics["r1"].item() <= 1
    assert not out.metrics["r1"].requires_grad and out.loss.requires_grad

    # The parts are the Q-Former's own losses: ITC with repeated captions as positives, ITG as is.
    tokens = model.text_tokenizer(captions, padding=True, truncation=True, return_tensors="pt",
                                  max_length=model.config.qformer.max_text_len)
    with torch.no_grad():
        qformer = model.qformer
        sim = qformer.similarity(qformer.image_embeds(features),
                                 qformer.text_embeds(tokens.input_ids, tokens.attention_mask))
        positives = positive_pairs(captions, keys)
        assert positives[0, 2] and not positives[0, 1]
        torch.testing.assert_close(out.losses["itc"].detach(), qformer.itc_loss(sim, sim.t(), positives))
        torch.testing.assert_close(out.losses["itg"].detach(),
                                   qformer.itg_loss(features, tokens.input_ids, tokens.attention_mask))


def test_stage1_parts_with_zero_weight_are_not_computed(tiny_config, tiny_images):
    model = QVLM.build(tiny_config.override(["stage1.itm_weight=0", "stage1.itg_weight=0"]), stage=1)
    out = Stage1Objective(model, model.config)(model.encode_images(tiny_images[:2]), ["a", "b"], ["k0", "k1"])
    assert set(out.losses) == {"itc"} and out.weights == {"itc": model.config.stage1.itc_weight}
    torch.testing.assert_close(out.loss, model.config.stage1.itc_weight * out.losses["itc"])


def test_stage2_objective_is_the_lm_loss_in_the_same_output_type(tiny_config, tiny_images):
    torch.manual_seed(0)
    model = QVLM.build(tiny_config, stage=2).eval()
    features = model.encode_images(tiny_images[:3])
    items = [{"features": f, "prompt": p, "answer": a, "image_key": str(i)}
             for i, (f, p, a) in enumerate(zip(features, ["What is it?", "Describe this image.", "Colour?"],
                                                ["a cat", "two dogs on a beach", "red"], strict=True))]
    batch = Stage2Collator(model.tokenizer, tiny_config.qformer.num_queries)(items)
    tensors = {k: batch[k] for k in ("features", "input_ids", "attention_mask", "image_mask", "labels")}
    out = Stage2Objective(model)(**tensors)
    assert isinstance(out, ObjectiveOutput) and set(out.losses) == {"answer"} and out.weights == {"answer": 1.0}
    torch.testing.assert_close(out.loss, out.losses["answer"])
    torch.testing.assert_close(out.loss, model(**tensors).loss)  # without descriptions: every label is an answer


def test_stage2_objective_weighs_answer_and_description_as_two_means(tiny_config, tiny_images):
    torch.manual_seed(0)
    model = QVLM.build(tiny_config, stage=2).eval()
    features = model.encode_images(tiny_images[:2])
    items = [{"features": features[0], "prompt": "a red circle on a white ground. is it red?",
              "description": "a red circle on a white ground", "answer": "yes", "image_key": "0"},
             {"features": features[1], "prompt": "Describe this image.", "description": None,
              "answer": "a blue square", "image_key": "1"}]
    batch = Stage2Collator(model.tokenizer, tiny_config.qformer.num_queries, learn_description=True)(items)
    tensors = {k: batch[k] for k in ("features", "input_ids", "attention_mask", "image_mask", "labels")}
    out = Stage2Objective(model, learn_description=True)(**tensors)

    labels = tensors["labels"]
    logits = model(**{k: v for k, v in tensors.items() if k != "labels"}).logits  # [B, L, V], all positions
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  reduction="none")  # [B, L-1]; -100 gives 0
    targets = labels[:, 1:]
    answer_ids = [model.tokenizer("yes", add_special_tokens=False).input_ids,
                  model.tokenizer("a blue square", add_special_tokens=False).input_ids]
    is_answer = torch.zeros_like(targets, dtype=torch.bool)
    for row, ids in enumerate(answer_ids):
        is_answer[row, -(len(ids) + 1):] = True  # the answer and its EOS end each left-padded row
    is_description = (targets != -100) & ~is_answer
    assert is_description[0].sum() >= 5 and not is_description[1].any()
    torch.testing.assert_close(out.losses["answer"], per_token[is_answer].mean())
    torch.testing.assert_close(out.losses["description"], per_token[is_description].mean())
    torch.testing.assert_close(out.loss, out.losses["answer"] + out.losses["description"])
