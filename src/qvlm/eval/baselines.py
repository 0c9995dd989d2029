"""Honest baselines for ``qvlm eval --baseline``: what much simpler models score on the run's own frozen features.

A Q-Former earns its keep only if it beats these on the same test images:

* ``chance`` (retrieval): the expected Recall@K of a random ranking, computed exactly from the number
  of candidates and positives of each query (repeated captions count as ``--match`` says).
* ``linear`` (retrieval): ridge regression from the frozen image encoder's pooled patch features to the
  frozen text encoder's sentence embedding (mean-pooled hidden states of the encoder the Q-Former was
  copied from, ``qformer.name``). Closed form; the ridge strength is chosen on a seeded validation split
  of the *training* images, never on the test set.
* ``nearest`` (caption): each test image gets the caption of its nearest training image (cosine of
  pooled features), the classic strong captioning baseline.
* ``blind`` (caption): the stage-2 model's caption of a blank mid-grey image, i.e. the LM's prior; the
  same caption is scored against every test image.
* ``prior`` (vqa): no image and no model: each test question gets the most common training answer of the
  same question (normalised as answers are), else of its answer type, else of all training questions.
  What a model scores that answers from the question's wording alone.

Retrieval baselines are scored with :func:`qvlm.eval.metrics.recall_at_k`, caption baselines with
:func:`qvlm.eval.metrics.caption_scores` and ``prior`` with :func:`qvlm.eval.metrics.vqa_scores`, exactly as
the run is. Features come through the run's
feature cache, so images the run has already encoded are not encoded again.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qvlm.data.images import SkipCounter
from qvlm.data.records import Record
from qvlm.errors import QVLMError
from qvlm.eval.evaluate import (
    CacheArg,
    image_groups,
    iter_feature_batches,
    load_records,
    open_cache,
    retrieval_positives,
)
from qvlm.eval.metrics import caption_scores, normalize_answer, recall_at_k, vqa_scores
from qvlm.models.processing import DEFAULT_CAPTION_PROMPT

if TYPE_CHECKING:
    from qvlm.models.vlm import QVLM

__all__ = [
    "BASELINE_TASKS",
    "check_request",
    "run_baselines",
    "chance_recall",
    "RidgeSolver",
    "fit_linear_map",
    "nearest_neighbours",
    "sentence_embeddings",
    "format_baseline_table",
]

BASELINE_TASKS = {"chance": "retrieval", "linear": "retrieval", "nearest": "caption", "blind": "caption",
                  "prior": "vqa"}
NEEDS_TRAIN = ("linear", "nearest", "prior")
KS = (1, 5, 10)
# Ridge strengths tried, as multiples of the mean eigenvalue of the centred Gram matrix XᵀX, so the
# grid suits any feature scale. At the top end W is nearly proportional to XcᵀYc (cosines ignore the
# scale), so the grid spans least squares to the plain cross-covariance map.
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
VAL_FRACTION = 0.1  # share of the training images that chooses the ridge strength
MIN_TRAIN_IMAGES = 4
BLANK_GREY = (128, 128, 128)


def check_request(names: Sequence[str], task: str, train: str | Path | None) -> None:
    """Fail before any model work when a baseline does not fit the task or lacks training data."""
    for name in names:
        if name not in BASELINE_TASKS:
            raise QVLMError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_TASKS)}")
        if BASELINE_TASKS[name] != task:
            fits = [n for n, t in BASELINE_TASKS.items() if t == task]
            hint = f"with --task {task} use {' / '.join(fits)}" if fits else f"--task {task} has no baselines"
            raise QVLMError(f"baseline {name!r} is for --task {BASELINE_TASKS[name]}; {hint}")
        if name in NEEDS_TRAIN and train is None:
            raise QVLMError(f"baseline {name!r} learns from training data: pass --train TRAIN (the data the "
                            "run was trained on; never the test set)")


# ----------------------------------------------------------------------------------------------
# Inputs: pooled image features and frozen sentence embeddings
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptionedImages:
    """Distinct images with their captions, as the retrieval and caption evaluations see them."""

    records: list[Record]  # one per kept (readable) image
    captions: list[list[str]]  # captions[i]: all captions of image i
    features: torch.Tensor  # [Ni, Dv] pooled frozen patch features, float32 CPU


@torch.no_grad()
def captioned_images(model: QVLM, records: Sequence[Record], batch_size: int, cache: CacheArg,
                     limit: int | None = None, desc: str | None = None) -> CaptionedImages:
    """The images of ``records`` that have captions (first ``limit``), unreadable ones skipped as the run does.

    ``desc`` names the progress bars (encoding a training set the run has not cached takes minutes).
    """
    groups = image_groups(records)[:limit]
    if not groups:
        raise QVLMError("baselines need records with captions; this data has none")
    by_key = {rec.key: caps for rec, caps in groups}
    skips = SkipCounter("images")
    kept: list[Record] = []
    pooled: list[torch.Tensor] = []
    for batch, feats in iter_feature_batches(model, [r for r, _ in groups], batch_size, skips,
                                             open_cache(model, cache), desc=desc):
        kept.extend(batch)
        pooled.append(feats.float().mean(dim=1).cpu())  # [B, P, Dv] -> [B, Dv]
    if not kept:
        raise QVLMError(f"no readable images for the baselines ({skips.summary()})")
    return CaptionedImages(kept, [by_key[r.key] for r in kept], torch.cat(pooled))


def load_text_encoder(model: QVLM) -> torch.nn.Module:
    """The frozen, pretrained text encoder the run's Q-Former was copied from (``qformer.name``)."""
    from transformers import AutoModel

    from qvlm import hub
    from qvlm.models.tiny import random_model

    cfg = model.config.qformer
    if cfg.random_init is not None:  # same seed as QFormer.build: the very weights the Q-Former started from
        encoder = random_model(AutoModel, cfg.random_init)
    else:
        encoder = hub.from_pretrained(AutoModel.from_pretrained, cfg.name, "Q-Former text encoder",
                                     use_safetensors=True)
    return encoder.to(model.device).eval()


@torch.no_grad()
def sentence_embeddings(encoder: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_len: int,
                        batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens, L2-normalised: [Nt, Dt] float32 CPU.

    Mean pooling is how sentence-transformers models such as all-MiniLM-L6-v2 embed a sentence.
    """
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        mask = tok["attention_mask"].to(device)  # [B, T]
        hidden = encoder(input_ids=tok["input_ids"].to(device), attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, T, Dt] -> [B, Dt]
        out.append(F.normalize(pooled.float(), dim=-1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# (a) chance
# ----------------------------------------------------------------------------------------------


def chance_recall(positives: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Expected Recall@K of a uniformly random ranking, for a bool ground truth [Ni, Nt].

    A query with p positives among n candidates misses the top K with probability
    C(n-p, K) / C(n, K) = prod_{j<K} (n-p-j) / (n-j); one positive gives R@K = K/n.
    """
    pos = np.asarray(positives, dtype=bool)
    out: dict[str, float] = {}
    for name, counts, n in (("i2t", pos.sum(1), pos.shape[1]), ("t2i", pos.sum(0), pos.shape[0])):
        for k in ks:
            miss = np.ones(len(counts))
            for j in range(min(k, n)):
                miss *= np.clip(n - counts - j, 0, None) / (n - j)
            out[f"{name}_r{k}"] = float((1.0 - miss).mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    out["n_images"], out["n_texts"] = int(pos.shape[0]), int(pos.shape[1])
    return out


# ----------------------------------------------------------------------------------------------
# (b) linear: ridge regression image features -> sentence embedding
# ----------------------------------------------------------------------------------------------


class RidgeSolver:
    """Closed-form ridge regression Y ≈ (X - x̄) W + ȳ for many strengths from one eigendecomposition.

    W(α) = V diag(1 / (s + α·mean(s))) Vᵀ Xcᵀ Yc, where Xcᵀ Xc = V diag(s) Vᵀ (float64 throughout).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        """x [N, Dv] inputs, y [N, Dt] targets (one row per image-caption pair)."""
        x, y = x.double(), y.double()
        self.x_mean, self.y_mean = x.mean(0), y.mean(0)
        xc, yc = x - self.x_mean, y - self.y_mean
        self.eigvals, self.eigvecs = torch.linalg.eigh(xc.T @ xc)  # [Dv], [Dv, Dv]
        self.scale = float(self.eigvals.clamp(min=0).mean())
        self.projected = self.eigvecs.T @ (xc.T @ yc)  # Vᵀ Xcᵀ Yc [Dv, Dt]

    def weight(self, alpha: float) -> torch.Tensor:
        """W [Dv, Dt] for ridge strength ``alpha`` (relative to the mean eigenvalue)."""
        shrink = 1.0 / (self.eigvals.clamp(min=0) + alpha * self.scale)  # [Dv]
        return self.eigvecs @ (shrink[:, None] * self.projected)

    def predict(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """x [M, Dv] -> predicted *centred* targets [M, Dt] (compare with y - y_mean)."""
        return (x.double() - self.x_mean) @ self.weight(alpha)


def _ridge_similarity(solver: RidgeSolver, alpha: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine of predicted and true text embeddings, both centred by the training mean: [Ni, Nt].

    Centring removes the direction every sentence embedding shares, which otherwise dominates cosines.
    """
    pred = F.normalize(solver.predict(x, alpha), dim=-1)
    return pred @ F.normalize(y.double() - solver.y_mean, dim=-1).T


def _per_caption(images: torch.Tensor, captions: list[list[str]]) -> torch.Tensor:
    """Image features repeated once per caption, to pair with the text embeddings: [Ni, Dv] -> [Nt, Dv]."""
    return images[torch.tensor([i for i, caps in enumerate(captions) for _ in caps])]


def _text_rows(captions: list[list[str]], images: Sequence[int]) -> list[int]:
    """Rows of the flattened caption list that belong to these images (image by image)."""
    start = np.cumsum([0] + [len(c) for c in captions])
    return [t for i in images for t in range(start[i], start[i + 1])]


def fit_linear_map(images: torch.Tensor, captions: list[list[str]], texts: torch.Tensor, match: str = "image",
                   alphas: Sequence[float] = RIDGE_ALPHAS, val_fraction: float = VAL_FRACTION,
                   seed: int = 0) -> tuple[RidgeSolver, float, dict[str, float]]:
    """Choose the ridge strength on a seeded validation split of these training images, then refit on all.

    images [Ni, Dv] pooled features; captions[i] the captions of image i; texts [Nt, Dt] their sentence
    embeddings, image by image. The strength with the best validation ``mean_recall`` wins (the
    smaller one on ties). Returns (solver on all images, chosen alpha, {alpha: validation mean recall}).
    """
    n = len(captions)
    if n < MIN_TRAIN_IMAGES:
        raise QVLMError(f"the linear baseline needs at least {MIN_TRAIN_IMAGES} training images with captions; "
                        f"--train has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(2, round(val_fraction * n))
    val, fit = sorted(order[:n_val]), sorted(order[n_val:])
    fit_captions = [captions[i] for i in fit]
    solver = RidgeSolver(_per_caption(images[fit], fit_captions), texts[_text_rows(captions, fit)])
    val_texts = texts[_text_rows(captions, val)]
    val_positives = retrieval_positives([captions[i] for i in val], match)
    scores = {alpha: recall_at_k(_ridge_similarity(solver, alpha, images[val], val_texts),
                                 val_positives)["mean_recall"] for alpha in alphas}
    best = max(alphas, key=lambda a: (scores[a], -a))
    return RidgeSolver(_per_caption(images, captions), texts), best, scores


def linear_baseline(model: QVLM, train: CaptionedImages, test: CaptionedImages, match: str,
                    batch_size: int) -> dict[str, Any]:
    """Ridge from pooled image features to frozen sentence embeddings, scored by ``recall_at_k`` on test."""
    encoder = load_text_encoder(model)

    def embed(captions: list[list[str]]) -> torch.Tensor:  # [Nt, Dt], captions image by image
        texts = [c for caps in captions for c in caps]
        return sentence_embeddings(encoder, model.text_tokenizer, texts, model.config.qformer.max_text_len,
                                   batch_size)

    solver, alpha, val_scores = fit_linear_map(train.features, train.captions, embed(train.captions), match)
    sim = _ridge_similarity(solver, alpha, test.features, embed(test.captions))
    return {**recall_at_k(sim, retrieval_positives(test.captions, match)), "ridge_alpha": alpha,
            "val_mean_recall": {str(a): s for a, s in val_scores.items()},
            "n_train_images": len(train.captions)}


# ----------------------------------------------------------------------------------------------
# (c) nearest-neighbour captions, (d) blind captions
# ----------------------------------------------------------------------------------------------


def nearest_neighbours(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Index of each query's most cosine-similar gallery row: [Nq, D] x [Ng, D] -> [Nq] (first on ties)."""
    return (F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T).argmax(dim=1)


def nearest_baseline(train: CaptionedImages, test: CaptionedImages) -> tuple[dict[str, Any], list[dict]]:
    """Each test image is captioned with the first caption of its nearest training image."""
    nearest = nearest_neighbours(test.features, train.features).tolist()
    predictions = [{"key": rec.key, "image": rec.image_path, "prediction": train.captions[j][0],
                    "neighbour": train.records[j].image_path or train.records[j].key, "references": refs}
                   for rec, refs, j in zip(test.records, test.captions, nearest, strict=True)]
    return _scored(predictions), predictions


@torch.no_grad()
def blind_baseline(model: QVLM, test: CaptionedImages, prompt: str, **gen: Any) -> dict[str, Any]:
    """The caption of a mid-grey image (what the LM says without seeing anything), scored on every test image."""
    if model.stage != 2:
        raise QVLMError("baseline 'blind' needs a stage-2 run (it generates with the run's LM)")
    side = model.vision.image_size
    features = model.encode_images([Image.new("RGB", (side, side), BLANK_GREY)])  # [1, P, Dv]
    caption = model.generate_from_features(features, [prompt], **gen)[0]
    predictions = [{"key": rec.key, "prediction": caption, "references": refs}
                   for rec, refs in zip(test.records, test.captions, strict=True)]
    return {**_scored(predictions), "caption": caption}


def _scored(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    return caption_scores({p["key"]: p["prediction"] for p in predictions},
                          {p["key"]: p["references"] for p in predictions})


# ----------------------------------------------------------------------------------------------
# (e) the question prior, for VQA
# ----------------------------------------------------------------------------------------------


def prior_baseline(train: Sequence[Record], test: Sequence[Record],
                   limit: int | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Answer each test question (the first ``limit``, as the run's evaluation) without its image."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str | None, Counter] = defaultdict(Counter)
    for rec in train:
        if rec.is_vqa and rec.answers:
            answers = Counter(normalize_answer(a) for a in rec.answers)  # VQAv2 has 10 answers per question
            by_question[normalize_answer(rec.question)] += answers
            by_type[rec.answer_type] += answers
    if not by_type:
        raise QVLMError("baseline 'prior' needs questions with answers in --train; it has none")
    overall = sum(by_type.values(), Counter())
    predictions = []
    for rec in [r for r in test if r.is_vqa and r.answers][:limit]:
        seen = by_question.get(normalize_answer(rec.question)) or by_type.get(rec.answer_type) or overall
        answer = seen.most_common(1)[0][0]
        predictions.append({"key": rec.key, "question": rec.question, "prediction": answer, "answers": rec.answers,
                            "answer_type": rec.answer_type})
    types = [p["answer_type"] for p in predictions] if any(p["answer_type"] for p in predictions) else None
    scores = vqa_scores([p["prediction"] for p in predictions], [p["answers"] for p in predictions], types)
    return {**scores, "unseen_questions": sum(normalize_answer(p["question"]) not in by_question
                                              for p in predictions)}, predictions


# ----------------------------------------------------------------------------------------------
# Orchestration and the comparison table
# ----------------------------------------------------------------------------------------------


def run_baselines(model: QVLM, records: Sequence[Record], names: Sequence[str], task: str,
                  train: str | Path | None = None, match: str = "image", batch_size: int = 16,
                  cache: CacheArg = None, limit: int | None = None, prompt: str = DEFAULT_CAPTION_PROMPT,
                  **gen: Any) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict]]]:
    """Score the named baselines on the test ``records`` (same images as the run's evaluation).

    Returns ({name: metrics}, {name: per-image predictions} for ``nearest`` and ``prior``). Each metrics
    dict has the keys of the run's own result (``recall_at_k``'s, ``caption_scores``'s or ``vqa_scores``'s)
    and ``seconds``; ``linear`` adds ``ridge_alpha`` and ``val_mean_recall``, ``blind`` its one
    ``caption``, ``prior`` its ``unseen_questions``; ``linear`` and ``nearest`` add
    ``test_images_in_train`` (a leak check, 0 for a clean split).
    """
    check_request(names, task, train)
    if task == "vqa":  # its one baseline reads no image
        started = time.monotonic()
        result, predictions = prior_baseline(load_records(train)[0], records, limit)
        return {"prior": {**result, "seconds": time.monotonic() - started}}, {"prior": predictions}
    cache = open_cache(model, cache)
    test = captioned_images(model, records, batch_size, cache, limit, desc="baseline: test images")
    train_set = shared = None
    if any(n in NEEDS_TRAIN for n in names):
        train_set = captioned_images(model, load_records(train)[0], batch_size, cache,
                                     desc="baseline: training images")
        shared = _shared_images(train_set, test)
    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[dict]] = {}
    for name in dict.fromkeys(names):  # each once, in the order asked
        started = time.monotonic()
        if name == "chance":
            results[name] = chance_recall(retrieval_positives(test.captions, match))
        elif name == "linear":
            results[name] = linear_baseline(model, train_set, test, match, batch_size)
        elif name == "nearest":
            results[name], predictions[name] = nearest_baseline(train_set, test)
        else:
            results[name] = blind_baseline(model, test, prompt, **gen)
        results[name]["seconds"] = time.monotonic() - started
        if train_set is not None and name in NEEDS_TRAIN:
            results[name]["test_images_in_train"] = shared
    return results, predictions


def _shared_images(train: CaptionedImages, test: CaptionedImages) -> int:
    """How many test images are also training images (same bytes): they flatter ``nearest`` and ``linear``."""
    seen = {r.content_hash() for r in train.records}
    return sum(r.content_hash() in seen for r in test.records)


_CAPTION_COLUMNS = {"bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr-D",
                    "spice": "SPICE", "distinct": "distinct"}


def format_baseline_table(result: dict[str, Any]) -> str:
    """The run's headline numbers and each baseline's, one row each (recalls in %)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    if result["task"] == "retrieval":
        rows.append(("run (ITC)", result))
        if "itm_i2t_r1" in result:
            rows.append((f"run (ITM top-{result.get('itm_top_k')})",
                         {k.removeprefix("itm_"): v for k, v in result.items() if k.startswith("itm_")}))
        columns = {f"{d}_r{k}": f"{d} R@{k}" for d in ("i2t", "t2i") for k in KS}
        percent = True
    elif result["task"] == "vqa":
        rows.append(("run", result))
        columns = {"exact_match": "exact", "soft_accuracy": "soft"} | {f"type:{t}": t for t in result["per_type"]}
        percent = True
    else:
        rows.append(("run", result))
        columns = {k: label for k, label in _CAPTION_COLUMNS.items() if k in result}
        percent = False
    for name, metrics in result.get("baselines", {}).items():
        label = f"{name} (ridge alpha {metrics['ridge_alpha']:g})" if name == "linear" else name
        rows.append((label, metrics))
    # VQA's per-type accuracies as columns of their own
    rows = [(label, m | {f"type:{t}": s["exact_match"] for t, s in m.get("per_type", {}).items()})
            for label, m in rows]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{h:>8}" for h in columns.values())]
    lines += [f"{label:<{width}}  " + "  ".join(f"{_cell(m.get(k), percent):>8}" for k in columns)
              for label, m in rows]
    leaked = max((m.get("test_images_in_train") or 0 for m in result.get("baselines", {}).values()), default=0)
    if leaked:
        lines.append(f"warning: {leaked} test image(s) are also in --train; the baselines that learn from it "
                     "are flattered")
    return "\n".join(lines)


def _cell(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.4f}"
