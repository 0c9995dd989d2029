"""Model evaluation over a dataset: retrieval (stage 1), captioning and VQA (stage 2).

Each ``evaluate_*`` function takes a loaded :class:`qvlm.models.vlm.QVLM` and a list of
:class:`qvlm.data.records.Record`, runs the model batch by batch and returns a plain dict (JSON-ready)
with the metric values of :mod:`qvlm.eval.metrics`, the number of samples used and skipped, and (for
caption / VQA) the per-sample predictions that the HTML gallery shows. Bad images are skipped and
counted, never fatal. ``qvlm eval``, training's validation and ``qvlm demo`` all call these.

With a feature cache (a folder or a :class:`~qvlm.data.cache.FeatureCache`) the frozen encoder runs at
most once per distinct image, across calls and across questions that share an image.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qvlm.console import progress
from qvlm.data.cache import FeatureCache
from qvlm.data.images import BadSample, SkipCounter
from qvlm.data.prompts import vqa_prompt
from qvlm.data.records import Record, read_records
from qvlm.errors import QVLMError
from qvlm.eval.metrics import caption_scores, exact_match, positives_from_groups, recall_at_k, vqa_scores
from qvlm.models.objectives import normalise_caption
from qvlm.models.processing import DEFAULT_CAPTION_PROMPT

if TYPE_CHECKING:
    from qvlm.models.vlm import QVLM

__all__ = [
    "load_records",
    "open_cache",
    "iter_feature_batches",
    "image_groups",
    "text_embeddings",
    "image_embeddings",
    "evaluate_retrieval",
    "retrieval_positives",
    "evaluate_captions",
    "evaluate_vqa",
    "write_report",
    "DEFAULT_ITM_TOP_K",
]

DEFAULT_ITM_TOP_K = 16  # BLIP-2 re-ranks the top 128 on COCO 5k; 16 keeps CPU runs short
CacheArg = FeatureCache | str | Path | None


# ----------------------------------------------------------------------------------------------
# Inputs: records, cache, features
# ----------------------------------------------------------------------------------------------


def load_records(spec: str | Path, limit: int | None = None) -> tuple[list[Record], SkipCounter]:
    """Read a dataset (manifest, table, shards, HF folder) into a list; malformed rows are counted.

    ``limit`` keeps the first N records. Raises ``QVLMError`` when nothing usable is left.
    """
    skips = SkipCounter("records")
    records: list[Record] = []
    for record in read_records(spec, skips=skips):
        if limit is not None and len(records) >= limit:
            break
        records.append(record)
    if not records:
        raise QVLMError(f"{spec}: no usable records ({skips.summary()})")
    return records, skips


def open_cache(model: QVLM, cache: CacheArg) -> FeatureCache | None:
    """A FeatureCache for the model's encoder from a folder (or pass one through; None stays None)."""
    if cache is None or isinstance(cache, FeatureCache):
        return cache
    return FeatureCache(cache, encoder=model.vision)


def _image_id(record: Record) -> str:
    """What makes two records "the same image": the file path, or the content hash for bytes."""
    return record.image_path or record.content_hash()


def iter_feature_batches(
    model: QVLM,
    records: Sequence[Record],
    batch_size: int,
    skips: SkipCounter,
    cache: FeatureCache | None = None,
    desc: str | None = None,
) -> Iterator[tuple[list[Record], torch.Tensor]]:
    """Yield (records, features [B, P, Dv] on the model's device) in order, bad images skipped.

    Each skipped record is counted in ``skips`` with its reason (missing, corrupt, truncated, ...).
    With a cache, every image not cached yet is encoded once first, then features are read back.
    With ``desc``, progress bars show the cache build and the records done (counted once the caller
    has used their batch, so the rate and ETA include its generation time).
    """
    if cache is not None:
        cache.build(records, batch_size=batch_size, progress=desc is not None)
    batch: list[Record] = []
    payload: list[Any] = []  # PIL images (no cache) or cache keys
    with progress(total=len(records), desc=desc, unit="sample", disable=desc is None) as bar:
        for seen, record in enumerate(records, 1):
            try:
                payload.append(_cache_key(cache, record) if cache is not None else record.open_image())
            except BadSample as e:
                skips.record(e, record.key)
                continue
            skips.ok()
            batch.append(record)
            if len(batch) == batch_size:
                yield batch, _features(model, payload, cache)
                bar.update(seen - bar.n)
                batch, payload = [], []
        if batch:
            yield batch, _features(model, payload, cache)
        bar.update(len(records) - bar.n)


def _cache_key(cache: FeatureCache, record: Record) -> str:
    key = cache.key_of(record)
    if key not in cache:
        record.open_image(cache.max_pixels)  # the build skipped it: decode again to learn why
        raise BadSample("unusable", "image was not cached")
    return key


@torch.no_grad()
def _features(model: QVLM, payload: list[Any], cache: FeatureCache | None) -> torch.Tensor:
    if cache is not None:
        return cache.get(payload).to(model.device)
    return model.encode_images(payload)


def image_groups(records: Iterable[Record]) -> list[tuple[Record, list[str]]]:
    """One entry per distinct image that has captions: (its first record, all its captions).

    Manifests may give one line per caption (repeated image) or one line with ``captions``; both
    end up as one image with several references.
    """
    groups: dict[str, tuple[Record, list[str]]] = {}
    for record in records:
        if not record.captions:
            continue
        try:
            image_id = _image_id(record)
        except BadSample:
            image_id = record.key  # unreadable bytes: keep it, the feature pass skips and counts it
        groups.setdefault(image_id, (record, []))[1].extend(record.captions)
    return list(groups.values())


def _skip_info(skips: SkipCounter) -> dict[str, Any]:
    return {"skipped": sum(skips.skipped.values()), "skipped_reasons": dict(skips.skipped),
            "skip_summary": skips.summary()}


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def text_embeddings(model: QVLM, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Q-Former ITC text embeddings [Nt, E] (L2-normalised, on CPU)."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = _tokenize(model, texts[start:start + batch_size])
        out.append(model.qformer.text_embeds(ids, mask).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.qformer.embed_dim)


def _tokenize(model: QVLM, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (input_ids [B, T], attention_mask [B, T]) on the model's device."""
    tok = model.text_tokenizer(list(texts), padding=True, truncation=True,
                               max_length=model.config.qformer.max_text_len, return_tensors="pt")
    return tok["input_ids"].to(model.device), tok["attention_mask"].to(model.device)


@torch.no_grad()
def image_embeddings(model: QVLM, features: torch.Tensor) -> torch.Tensor:
    """Patch features [B, P, Dv] -> per-query ITC embeddings [B, Nq, E] (float32, CPU)."""
    return model.qformer.image_embeds(features.to(model.device)).float().cpu()


def _use_itm(model: QVLM, itm: bool | None) -> bool:
    """ITM re-ranking only means something when the ITM head was trained (stage1.itm_weight > 0)."""
    return bool(model.config.stage1.itm_weight > 0) if itm is None else itm


@torch.no_grad()
def evaluate_retrieval(
    model: QVLM,
    records: Sequence[Record],
    batch_size: int = 32,
    cache: CacheArg = None,
    limit: int | None = None,
    itm: bool | None = None,
    itm_top_k: int = DEFAULT_ITM_TOP_K,
    match: str = "image",
) -> dict[str, Any]:
    """Image<->text Recall@1/5/10 with the Q-Former's ITC similarity (several captions per image).

    Args:
        records: caption records; records sharing an image are merged (see :func:`image_groups`),
            records without captions are ignored.
        limit: evaluate the first N distinct images only.
        itm: re-rank the top ``itm_top_k`` candidates with the ITM head (default: when the config
            trained it, ``stage1.itm_weight > 0``).
        match: ``"image"``: a caption is correct for its own image only (COCO/Flickr protocol);
            ``"caption"``: for every image that has an equal caption (after lower-casing and collapsing
            whitespace) — for data whose captions repeat, like easy-VQA's 24 distinct ones.

    Returns:
        ``recall_at_k``'s keys (``i2t_r1`` ... ``t2i_r10``, ``mean_recall``, ``n_images``,
        ``n_texts``), ``itm_``-prefixed recalls when re-ranked, ``skipped`` counts and ``seconds``.
    """
    started = time.monotonic()
    groups = image_groups(records)[:limit]
    if not groups:
        raise QVLMError("retrieval needs records with captions; this data has none")
    skips = SkipCounter("images")
    by_key = {rec.key: caps for rec, caps in groups}
    use_itm = _use_itm(model, itm)
    kept: list[Record] = []
    img_embeds: list[torch.Tensor] = []
    features: list[torch.Tensor] = []  # fp16 CPU copies, only for the ITM pass
    for batch, feats in iter_feature_batches(model, [r for r, _ in groups], batch_size, skips,
                                             open_cache(model, cache), desc="eval retrieval"):
        kept.extend(batch)
        img_embeds.append(image_embeddings(model, feats))
        if use_itm:
            features.append(feats.to("cpu", torch.float16))
    if not kept:
        raise QVLMError(f"no readable images to evaluate ({skips.summary()})")
    texts = [c for rec in kept for c in by_key[rec.key]]
    sim = model.qformer.similarity(torch.cat(img_embeds), text_embeddings(model, texts, batch_size))
    positives = retrieval_positives([by_key[rec.key] for rec in kept], match)
    result = recall_at_k(sim, positives)
    if use_itm:
        result |= _itm_reranked(model, torch.cat(features), texts, sim.float().cpu(), positives,
                                itm_top_k, batch_size)
    return {**result, **_skip_info(skips), "seconds": time.monotonic() - started}


def retrieval_positives(captions: Sequence[Sequence[str]], match: str = "image") -> np.ndarray:
    """Ground truth bool [Ni, Nt] for Ni images with these captions; texts are all captions, image by image.

    ``match="image"``: a text matches its own image only; ``"caption"``: every image with an equal
    caption (see :func:`evaluate_retrieval`).
    """
    texts = [c for caps in captions for c in caps]
    if match == "caption":
        captions_of = [{normalise_caption(c) for c in caps} for caps in captions]
        return np.array([[normalise_caption(t) in caps for t in texts] for caps in captions_of], dtype=bool)
    if match == "image":
        owner = [i for i, caps in enumerate(captions) for _ in caps]
        return positives_from_groups(owner, list(range(len(captions))))
    raise ValueError(f"match must be 'image' or 'caption', got {match!r}")


def _itm_reranked(model: QVLM, features: torch.Tensor, texts: Sequence[str], sim: torch.Tensor,
                  positives: Any, top_k: int, batch_size: int) -> dict[str, float]:
    """BLIP-2's re-ranking: the ITM head re-scores each row's / column's top-k ITC candidates.

    features [Ni, P, Dv], sim [Ni, Nt]. Re-scored candidates get ``2 + p_match`` so they stay above
    the rest (cosine <= 1), whose ITC order is kept. Returns ``itm_i2t_rK`` / ``itm_t2i_rK`` and
    ``itm_top_k``.
    """
    ni, nt = sim.shape
    k_txt, k_img = min(top_k, nt), min(top_k, ni)
    i2t_top = sim.topk(k_txt, dim=1).indices  # [Ni, k]
    t2i_top = sim.topk(k_img, dim=0).indices  # [k, Nt]
    pairs = {(i, int(t)) for i in range(ni) for t in i2t_top[i]}
    pairs |= {(int(i), t) for t in range(nt) for i in t2i_top[:, t]}
    scores = _itm_pair_scores(model, features, texts, sorted(pairs), batch_size)
    i2t, t2i = sim.clone(), sim.clone()
    for i in range(ni):
        for t in i2t_top[i].tolist():
            i2t[i, t] = 2.0 + scores[(i, t)]
    for t in range(nt):
        for i in t2i_top[:, t].tolist():
            t2i[i, t] = 2.0 + scores[(i, t)]
    by_row, by_col = recall_at_k(i2t, positives), recall_at_k(t2i, positives)
    out = {f"itm_{k}": v for k, v in by_row.items() if k.startswith("i2t_")}
    out |= {f"itm_{k}": v for k, v in by_col.items() if k.startswith("t2i_")}
    return {**out, "itm_top_k": top_k}


def _itm_pair_scores(model: QVLM, features: torch.Tensor, texts: Sequence[str],
                     pairs: list[tuple[int, int]], batch_size: int) -> dict[tuple[int, int], float]:
    """Match probability of each (image index, text index) pair, batch by batch."""
    scores: dict[tuple[int, int], float] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        vision = features[[i for i, _ in chunk]].to(model.device, torch.float32)
        ids, mask = _tokenize(model, [texts[t] for _, t in chunk])
        probs = model.qformer.itm_scores(vision, ids, mask).float().cpu().tolist()
        scores.update(zip(chunk, probs, strict=True))
    return scores


# ----------------------------------------------------------------------------------------------
# Generation: captions and VQA
# ----------------------------------------------------------------------------------------------


def _require_stage2(model: QVLM, task: str) -> None:
    if model.stage != 2:
        raise QVLMError(f"{task} needs a stage-2 model; this is a stage-1 model (Q-Former only). "
                        "Train stage 2 (`qvlm train stage2 --init RUN ...`) or use --task retrieval")


@torch.no_grad()
def evaluate_captions(
    model: QVLM,
    records: Sequence[Record],
    batch_size: int = 16,
    cache: CacheArg = None,
    limit: int | None = None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    **gen: Any,
) -> dict[str, Any]:
    """Caption each distinct image and score against its references (COCO BLEU-4, ROUGE-L, CIDEr-D).

    ``gen`` goes to ``model.generate_from_features`` (max_new_tokens, num_beams, temperature, ...;
    greedy by default). Returns ``{"bleu4", "rouge_l", "cider", "n", "skipped", ...,
    "predictions": [{"key", "image", "prediction", "references"}], "seconds"}``.
    """
    _require_stage2(model, "captioning")
    started = time.monotonic()
    groups = image_groups(records)[:limit]
    if not groups:
        raise QVLMError("caption evaluation needs records with captions; this data has none")
    refs = {rec.key: caps for rec, caps in groups}
    skips = SkipCounter("images")
    predictions: list[dict[str, Any]] = []
    for batch, feats in iter_feature_batches(model, [r for r, _ in groups], batch_size, skips,
                                             open_cache(model, cache), desc="eval captions"):
        texts = model.generate_from_features(feats, [prompt] * len(batch), **gen)
        predictions += [{"key": r.key, "image": r.image_path, "prediction": text, "references": refs[r.key]}
                        for r, text in zip(batch, texts, strict=True)]
    if not predictions:
        raise QVLMError(f"no readable images to caption ({skips.summary()})")
    scores = caption_scores({p["key"]: p["prediction"] for p in predictions},
                            {p["key"]: p["references"] for p in predictions})
    return {**scores, **_skip_info(skips), "seconds": time.monotonic() - started, "predictions": predictions}


@torch.no_grad()
def evaluate_vqa(
    model: QVLM,
    records: Sequence[Record],
    batch_size: int = 16,
    limit: int | None = None,
    cache: CacheArg = None,
    **gen: Any,
) -> dict[str, Any]:
    """Answer each question and score it (VQAv2 normalisation: exact match, soft accuracy, per type).

    Records without a question or without reference answers are ignored; ``limit`` keeps the first
    N questions. ``gen`` as in :func:`evaluate_captions` (default ``max_new_tokens=16``). Returns
    ``vqa_scores``'s keys (``n``, ``exact_match``, ``soft_accuracy``, ``per_type``), skip counts,
    ``seconds`` and ``predictions`` ``[{"key", "image", "question", "prediction", "answers",
    "answer_type", "correct"}]``.
    """
    _require_stage2(model, "VQA")
    started = time.monotonic()
    questions = [r for r in records if r.is_vqa and r.answers][:limit]
    if not questions:
        raise QVLMError("VQA evaluation needs records with a question and answer(s); this data has none")
    gen = {"max_new_tokens": 16, **gen}  # answers are a few words
    skips = SkipCounter("questions")
    predictions: list[dict[str, Any]] = []
    for batch, feats in iter_feature_batches(model, questions, batch_size, skips, open_cache(model, cache),
                                             desc="eval vqa"):
        texts = model.generate_from_features(feats, [vqa_prompt(r.question or "") for r in batch], **gen)
        predictions += [_vqa_prediction(r, text) for r, text in zip(batch, texts, strict=True)]
    if not predictions:
        raise QVLMError(f"no readable images to ask about ({skips.summary()})")
    has_types = any(p["answer_type"] for p in predictions)
    scores = vqa_scores([p["prediction"] for p in predictions], [p["answers"] for p in predictions],
                        [p["answer_type"] for p in predictions] if has_types else None)
    return {**scores, **_skip_info(skips), "seconds": time.monotonic() - started, "predictions": predictions}


def _vqa_prediction(record: Record, text: str) -> dict[str, Any]:
    return {"key": record.key, "image": record.image_path, "question": record.question, "prediction": text,
            "answers": record.answers, "answer_type": record.answer_type,
            "correct": bool(exact_match(text, record.answers))}


# ----------------------------------------------------------------------------------------------
# Report files in a run folder
# ----------------------------------------------------------------------------------------------


def write_report(
    model: QVLM,
    run_dir: str | Path,
    records: Sequence[Record] | None = None,
    out_dir: str | Path | None = None,
    n_grid: int = 8,
    n_gallery: int = 24,
    n_attention: int = 4,
    batch_size: int = 16,
    **gen: Any,
) -> dict[str, Path]:
    """Write the run's report files and return them by name.

    * ``loss``: ``loss.png`` from ``RUN/metrics.jsonl`` (when the run has one);
    * ``similarity``: ``similarity.png``, the Q-Former ITC similarity of up to ``n_grid`` images of
      ``records`` against their first captions (needs caption records);
    * ``attention``: ``attention.png``, where each Q-Former query looks in the first ``n_attention``
      images (cross-attention over the patches, averaged over heads and layers);
    * ``gallery``: ``gallery.html``, generated answers (VQA records) or captions beside the references
      for up to ``n_gallery`` samples (stage-2 models only);
    * ``word_attention``: ``word_attention.png``, which queries each generated word of the gallery's
      first ``n_attention`` answers or captions drew on, and how much it looked at the image at all
      (``QVLM.word_query_attention``; stage-2 models only).

    Files go to ``out_dir`` (default ``RUN/report/``). Report functions load matplotlib: imported here.
    """
    from qvlm.eval.report import plot_loss_curves

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    paths: dict[str, Path] = {}
    if (run_dir / "metrics.jsonl").is_file():
        plot_loss_curves(run_dir / "metrics.jsonl", out / "loss.png")
        paths["loss"] = out / "loss.png"
    records = list(records or [])
    if any(r.captions for r in records):
        paths["similarity"] = _similarity_figure(model, records, out / "similarity.png", n_grid, batch_size)
    if records:
        paths["attention"] = _attention_figure(model, records, out / "attention.png", n_attention)
    if records and model.stage == 2:
        paths["gallery"] = _gallery(model, records, out / "gallery.html", n_gallery, batch_size, **gen)
        paths["word_attention"] = _word_attention_figure(model, records, out / "word_attention.png", n_attention,
                                                         **gen)
    return paths


@torch.no_grad()
def _similarity_figure(model: QVLM, records: Sequence[Record], out_png: Path, n: int, batch_size: int) -> Path:
    from qvlm.eval.report import plot_similarity_grid

    groups = image_groups(records)
    first_caption = {rec.key: caps[0] for rec, caps in groups}
    kept: list[Record] = []
    embeds: list[torch.Tensor] = []
    # Take a few more than n so that a bad image or two does not shrink the figure.
    for batch, feats in iter_feature_batches(model, [r for r, _ in groups[: 2 * n]], batch_size,
                                             SkipCounter("images")):
        kept.extend(batch)
        embeds.append(image_embeddings(model, feats))
    if not kept:
        raise QVLMError("no readable image with a caption for the similarity grid")
    kept, image_embeds = kept[:n], torch.cat(embeds)[:n]
    captions = [first_caption[r.key] for r in kept]
    sim = model.qformer.similarity(image_embeds, text_embeddings(model, captions))  # [Ni, Nt]
    images = [r.open_image() for r in kept]
    return plot_similarity_grid(images, captions, sim, out_png, title="Q-Former image-text similarity (ITC)")


@torch.no_grad()
def _attention_figure(model: QVLM, records: Sequence[Record], out_png: Path, n: int) -> Path:
    from qvlm.eval.report import plot_query_attention

    kept, images, seen = [], [], set()
    for record in records:  # the first n distinct readable images
        try:
            image_id = _image_id(record)
            if image_id not in seen:
                images.append(record.open_image())
                kept.append(record)
                seen.add(image_id)
        except BadSample:
            continue
        if len(kept) == n:
            break
    if not kept:
        raise QVLMError("no readable image for the attention figure")
    features = model.encode_images(images)  # [N, P, Dv]
    # An instruction-aware model's queries read the question (or the caption prompt) too.
    questions = [r.question or DEFAULT_CAPTION_PROMPT for r in kept]
    maps = model.patch_attention(features, questions)  # [N, Nq, G, G]
    return plot_query_attention(images, maps, out_png)


@torch.no_grad()
def _word_attention_figure(model: QVLM, records: Sequence[Record], out_png: Path, n: int, **gen: Any) -> Path:
    """The first n answers (VQA records) or captions, chosen and generated as the gallery does, word by word."""
    from qvlm.eval.report import plot_word_query_attention

    questions = [r for r in records if r.is_vqa and r.answers]
    if questions:
        chosen, gen = questions[:n], {"max_new_tokens": 16, **gen}  # evaluate_vqa's default
    else:
        chosen = [r for r, _ in image_groups(records)][:n]
    kept, samples = [], []
    for batch, feats in iter_feature_batches(model, chosen, n, SkipCounter("images")):  # one batch
        prompts = [vqa_prompt(r.question or "") if questions else DEFAULT_CAPTION_PROMPT for r in batch]
        kept += batch
        samples += model.word_query_attention(feats, prompts, **gen)
    if not kept:
        raise QVLMError("no readable image for the word attention figure")
    return plot_word_query_attention([r.open_image() for r in kept], samples, out_png)


def _gallery(model: QVLM, records: Sequence[Record], out_html: Path, n: int, batch_size: int,
             **gen: Any) -> Path:
    """VQA gallery when the data has questions with answers, else a caption gallery."""
    from qvlm.eval.report import write_gallery

    if any(r.is_vqa and r.answers for r in records):
        result = evaluate_vqa(model, records, batch_size, limit=n, **gen)
        title = f"VQA answers - exact match {100 * result['exact_match']:.1f}% on {result['n']}"
        items = [{"image": p["image"] or "", "question": p["question"], "prediction": p["prediction"],
                  "references": p["answers"], "correct": p["correct"],
                  "extra": {"answer type": p["answer_type"]} if p["answer_type"] else {}}
                 for p in result["predictions"]]
    else:
        result = evaluate_captions(model, records, batch_size, limit=n, **gen)
        title = f"Captions - BLEU-4 {result['bleu4']:.3f}, CIDEr {result['cider']:.3f} on {result['n']}"
        items = [{"image": p["image"] or "", "prediction": p["prediction"], "references": p["references"]}
                 for p in result["predictions"]]
    return write_gallery(items, out_html, title)
