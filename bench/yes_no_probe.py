"""Where in the LM a yes/no answer is formed: linear probes on the hidden state at the answer position.

    python bench/yes_no_probe.py RUN VAL_MANIFEST [--limit 1600] [--every 3] [--cache DIR]

For easy-VQA's yes/no questions ("is there a red shape?", "is there not a circle?") the model's last
prompt position must hold what the image shows, what the question asks, whether it is negated, and
from those the answer. Each row of the output is one such quantity; each column a layer (0 is the
embeddings), with the held-out accuracy of a logistic regression trained on the first half of the
questions' hidden states and scored on the second half. A quantity at 1.00 is linearly readable there.
The image's colour and shape come from the image's caption in the manifest ("a blue triangle").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qvlm.data.images import SkipCounter
from qvlm.data.records import load_records
from qvlm.eval.evaluate import iter_feature_batches, open_cache
from qvlm.models.vlm import QVLM


@torch.no_grad()
def answer_position_states(model: QVLM, questions, cache) -> np.ndarray:
    """[N, layers + 1, D]: each layer's hidden state at the last prompt position (where the answer starts)."""
    states = []
    for batch, features in iter_feature_batches(model, questions, 64, SkipCounter(), cache):
        inputs = model.processor(text=[r.question for r in batch])
        embeds = model.embed_inputs(features, inputs["input_ids"], inputs["image_mask"])
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding, as in training
        out = model.lm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=positions,
                       output_hidden_states=True)
        states.append(torch.stack([h[:, -1] for h in out.hidden_states], dim=1).float())  # [B, L+1, D]
    return torch.cat(states).numpy()


def probe(states: np.ndarray, target: np.ndarray, layers: range) -> list[float]:
    half = len(target) // 2
    scores = []
    for layer in layers:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
        scores.append(clf.fit(states[:half, layer], target[:half]).score(states[half:, layer], target[half:]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("manifest")
    parser.add_argument("--limit", type=int, default=1600, help="yes/no questions probed")
    parser.add_argument("--every", type=int, default=3, help="probe every Nth layer")
    parser.add_argument("--cache", default=None, help="feature cache folder (as train.feature_cache)")
    args = parser.parse_args()

    records = load_records(args.manifest)
    caption = {r.image_path: r.captions[0].split() for r in records if r.captions}  # "a blue triangle"
    questions = [r for r in records if r.answer_type == "yes/no" and r.image_path in caption][:args.limit]
    model = QVLM.from_pretrained(args.run).eval()
    states = answer_position_states(model, questions, open_cache(model, args.cache))
    targets = {
        "answer is yes": np.array([r.answers[0] == "yes" for r in questions]),
        "question negated": np.array([bool({"not", "no"} & set(r.question.split())) for r in questions]),
        "image colour": np.array([caption[r.image_path][1] for r in questions]),
        "image shape": np.array([caption[r.image_path][2] for r in questions]),
    }
    layers = range(0, states.shape[1], args.every)
    print(f"{args.run}: {len(questions)} yes/no questions, held-out accuracy by layer")
    print("| probe | majority | " + " | ".join(f"layer {i}" for i in layers) + " |")
    print("|---" * (len(layers) + 2) + "|")
    for name, target in targets.items():
        half = len(target) // 2
        majority = max(np.mean(target[half:] == v) for v in np.unique(target))
        print(f"| {name} | {majority:.2f} | " + " | ".join(f"{s:.2f}" for s in probe(states, target, layers)) + " |")


if __name__ == "__main__":
    main()
