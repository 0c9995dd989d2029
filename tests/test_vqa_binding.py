"""Yes/no questions that only the image can answer: the failure mode where a model answers from the
question's wording alone (a blind model) must be caught here, not by users.

Every image gets one "is there a <its colour> shape?" (yes) and one question about another colour (no),
so the answer is balanced and a model that ignores the image scores 50%.
"""

import json

import pytest
from helpers import COLOURS, SHAPES, shape_image

from qvlm.config import get_preset
from qvlm.data.records import load_records
from qvlm.eval.evaluate import evaluate_vqa
from qvlm.models.vlm import QVLM
from qvlm.train.trainer import train


def write_yes_no(root, name: str, n_images: int, first: int):
    colours, rows = list(COLOURS), []
    for i in range(n_images):
        colour, shape = colours[i % 4], SHAPES[(i // 4) % 2]
        other = colours[(i % 4 + 1 + (i // 8) % 3) % 4]  # each other colour in turn
        path = root / f"{first + i}.png"
        shape_image(colour, shape, seed=first + i).save(path)
        rows += [{"image": path.name, "question": f"is there a {colour} shape?", "answer": "yes",
                  "answer_type": "yes/no"},
                 {"image": path.name, "question": f"is there a {other} shape?", "answer": "no",
                  "answer_type": "yes/no"}]
    manifest = root / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.parametrize("instruction_aware", [True, False])
def test_yes_no_answers_come_from_the_image_not_the_question(instruction_aware, tmp_path, private_cache):
    train_manifest = write_yes_no(tmp_path, "train", 48, first=0)
    test_manifest = write_yes_no(tmp_path, "test", 16, first=1000)  # unseen images
    config = get_preset("tiny").override([
        f"qformer.instruction_aware={str(instruction_aware).lower()}", "stage2.max_steps=400",
        "stage2.epochs=1000", "stage2.batch_size=8", "train.eval_every=100000", "train.save_every=100000"])
    train(config, 2, str(train_manifest), tmp_path / "run")

    model = QVLM.from_pretrained(tmp_path / "run")
    result = evaluate_vqa(model, load_records(test_manifest), max_new_tokens=3)
    assert {p["prediction"] for p in result["predictions"]} == {"yes", "no"}
    assert result["exact_match"] >= 0.8  # blind: 0.5
