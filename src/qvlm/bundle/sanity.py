"""Sanity checks of the converted bundle, for docs/offline-bundle.md: `python -m qvlm.bundle.sanity`.

Each check shows the weights are real pretrained ones (not merely loadable): the LM answers a factual
question, MiniLM ranks a paraphrase above an unrelated sentence, DINOv2 features separate digit classes
far better than the same architecture with random weights. Needs scikit-learn for the last two.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qvlm.bundle import ensure

QUESTION = "What is the capital of France?"


def lm_answer(question: str = QUESTION, max_new_tokens: int = 30) -> tuple[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure("smollm2-135m-instruct")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    load_s = time.perf_counter() - start
    inputs = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip(), load_s


def sentence_embeddings(sentences: list[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean pooling over tokens, then L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    folder = ensure("all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def minilm_similarities() -> dict[str, float]:
    anchor = "A man is playing a guitar on stage."
    others = {"paraphrase": "A musician performs a song with his guitar.",
              "related": "A woman is playing the piano.",
              "unrelated": "The stock market fell sharply on Monday."}
    emb = sentence_embeddings([anchor, *others.values()])
    return {k: float(emb[0] @ emb[i + 1]) for i, k in enumerate(others)}


def _digit_images(size: int) -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.repeat(1, 3, 1, 1) - mean) / std, digits.target


def _cls_features(model, pixels: torch.Tensor, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(pixel_values=pixels[i:i + batch]).pooler_output
                          for i in range(0, len(pixels), batch)]).numpy()


def dinov2_knn(size: int = 112, k: int = 5) -> dict[str, float]:
    """5-NN (cosine) accuracy of CLS features on scikit-learn digits, half train / half test."""
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier
    from transformers import AutoModel, Dinov2Model

    pixels, labels = _digit_images(size)
    pretrained = AutoModel.from_pretrained(ensure("dinov2-small")).eval()
    torch.manual_seed(0)
    random = Dinov2Model(pretrained.config).eval()
    result = {}
    for name, model in (("pretrained", pretrained), ("random", random)):
        feats = _cls_features(model, pixels)
        xtr, xte, ytr, yte = train_test_split(feats, labels, test_size=0.5, random_state=0, stratify=labels)
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(xtr, ytr)
        result[name] = float(knn.score(xte, yte))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["lm", "minilm", "dinov2"])
    args = parser.parse_args()
    if "lm" not in args.skip:
        answer, load_s = lm_answer()
        print(f"SmolLM2 greedy answer to {QUESTION!r}: {answer!r} (folder loaded in {load_s:.2f} s)")
    if "minilm" not in args.skip:
        sims = minilm_similarities()
        print("MiniLM cosine similarity to 'A man is playing a guitar on stage.': "
              + ", ".join(f"{k} {v:.3f}" for k, v in sims.items()))
    if "dinov2" not in args.skip:
        start = time.perf_counter()
        acc = dinov2_knn()
        print(f"DINOv2 5-NN on sklearn digits (112 px, CLS): pretrained {acc['pretrained']:.3f}, "
              f"random {acc['random']:.3f} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
