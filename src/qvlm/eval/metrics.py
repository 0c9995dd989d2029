"""Evaluation metrics: retrieval Recall@K, VQA exact match / soft accuracy, COCO caption scores.

Every function here is pure (no model, no I/O) so that ``qvlm eval`` and the tests can call it on
plain arrays and strings. Definitions and worked examples are in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "recall_at_k",
    "positives_from_groups",
    "normalize_answer",
    "exact_match",
    "vqa_soft_accuracy",
    "vqa_scores",
    "ptb_tokenize",
    "caption_scores",
]


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


def _as_numpy(x: Any, dtype: Any) -> np.ndarray:
    """Tensor (any device / dtype, incl. bf16) or array-like -> numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().float().cpu().numpy() if dtype is not bool else x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def positives_from_groups(
    image_ids_of_texts: Sequence[Hashable], image_ids: Sequence[Hashable]
) -> np.ndarray:
    """Ground-truth match matrix for retrieval.

    Args:
        image_ids_of_texts: length Nt; the image id each text (caption) belongs to.
        image_ids: length Ni; the id of each image, in the row order of the similarity matrix.

    Returns:
        bool array [Ni, Nt]; ``out[i, t]`` is True when text ``t`` describes image ``i``.
    """
    row_of = {img: i for i, img in enumerate(image_ids)}
    if len(row_of) != len(image_ids):
        raise ValueError("image_ids must be unique")
    out = np.zeros((len(image_ids), len(image_ids_of_texts)), dtype=bool)
    for t, img in enumerate(image_ids_of_texts):
        if img not in row_of:
            raise ValueError(f"text {t} refers to unknown image id {img!r}")
        out[row_of[img], t] = True
    return out


def _best_positive_ranks(sim: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """0-based rank of the best-scoring positive in each row of ``sim`` [R, C] -> int array [R].

    The rank counts the negatives scoring >= the best positive. Ties count against the model, so a
    collapsed model that gives every pair the same score gets R@K ~ K/C, not 100%.
    """
    best_pos = np.where(pos, sim, -np.inf).max(axis=1, keepdims=True)
    return ((sim >= best_pos) & ~pos).sum(axis=1)


def recall_at_k(sim: Any, positives: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image<->text retrieval Recall@K in both directions.

    Args:
        sim: similarity scores [Ni, Nt] (torch.Tensor or array), higher = more similar; NaN counts as
            the lowest score.
        positives: bool [Ni, Nt]; True where text t describes image i. Several texts per image
            (Nt > Ni, e.g. 5 COCO captions) are allowed; each row and each column needs >= 1 True
            (see :func:`positives_from_groups`).
        ks: the K values.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_recall",
        "n_images", "n_texts"}``. Recalls are fractions in [0, 1]. ``i2t_rK``: share of images with
        at least one of their texts among the top K texts of their row; ``t2i_rK``: share of texts
        whose image is among the top K images of their column. ``mean_recall`` is the mean of the
        2*len(ks) recalls.
    """
    s = _as_numpy(sim, np.float64)
    pos = _as_numpy(positives, bool)
    if s.ndim != 2 or s.shape != pos.shape:
        raise ValueError(f"sim {s.shape} and positives {pos.shape} must be 2-D and the same shape")
    if not pos.any(axis=1).all():
        raise ValueError(f"{int((~pos.any(axis=1)).sum())} image row(s) have no positive text")
    if not pos.any(axis=0).all():
        raise ValueError(f"{int((~pos.any(axis=0)).sum())} text column(s) have no positive image")
    s = np.where(np.isnan(s), -np.inf, s)
    i2t = _best_positive_ranks(s, pos)  # [Ni]
    t2i = _best_positive_ranks(s.T, pos.T)  # [Nt]
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = float((ranks < k).mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    out["n_images"], out["n_texts"] = int(s.shape[0]), int(s.shape[1])
    return out


# ----------------------------------------------------------------------------------------------
# VQA: the official VQAv2 answer normalisation (vqaEval.py, GT-Vision-Lab/VQA), tables verbatim
# ----------------------------------------------------------------------------------------------

# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ["a", "an", "the"]
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
# fmt: on
# The official pattern is verbatim, typo included: "(?!<=\d)" was meant as a look-behind but is a
# look-ahead that never blocks, so every period not followed by a digit is removed ("2.5" keeps its).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop a mark next to a space (or anywhere if the text has a
    digit-comma-digit number), otherwise turn it into a space; then strip periods."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call is sub("", out, re.UNICODE): the flag lands in `count`, so at most 32
    # periods go. Kept for fidelity; answers never have that many.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles, add the
    apostrophe to known contractions ("dont" -> "don't")."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """The VQAv2 answer normalisation (official ``vqaEval.py``): whitespace, punctuation,
    lower-case, number words 0-10 to digits, articles removed, contractions restored.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def _as_answer_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the normalised majority answer, else 0.0.

    ``answers`` is one answer or the list of human answers. With a list, the target is the most
    frequent normalised answer (first one on ties), i.e. VQAv2's ``multiple_choice_answer``.
    """
    norm = [normalize_answer(a) for a in _as_answer_list(answers)]
    if not norm:
        raise ValueError("no reference answers")
    majority = Counter(norm).most_common(1)[0][0]
    return float(normalize_answer(pred) == majority)


def vqa_soft_accuracy(pred: str, answers: str | Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against its human answers (all normalised first).

    Rule by the number of answers n:

    * n >= 4 (10 in VQAv2): the official score, the mean over the n leave-one-out subsets of
      ``min(#matches in the subset / 3, 1)``. For n = 10 this is exactly vqaEval.py.
    * n <= 3: the fraction of answers that match, ``#matches / n``; for n = 1 this is exact match.
      (min(#matches/3, 1) would cap single-answer data at 1/3 and leave-one-out with n <= 3 could
      never reach 1.)

    Example: 2 of 10 humans gave the prediction -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    """
    norm = [normalize_answer(a) for a in _as_answer_list(answers)]
    if not norm:
        raise ValueError("no reference answers")
    p = normalize_answer(pred)
    matches = sum(a == p for a in norm)
    n = len(norm)
    if n <= 3:
        return matches / n
    # Leaving out a matching answer leaves matches-1; leaving out any other leaves matches.
    return (matches * min((matches - 1) / 3, 1.0) + (n - matches) * min(matches / 3, 1.0)) / n


def vqa_scores(
    preds: Sequence[str],
    answers_list: Sequence[str | Sequence[str]],
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Corpus VQA scores.

    Args:
        preds: N predicted answers.
        answers_list: N entries, each one answer (str) or the list of human answers.
        answer_types: optional N type labels (VQAv2 "yes/no" / "number" / "other"; easy-VQA
            "yes/no" / "color" / "shape"); None entries are grouped under "unknown".

    Returns:
        ``{"n", "exact_match", "soft_accuracy", "per_type": {type: {"n", "exact_match",
        "soft_accuracy"}}}``; accuracies are fractions in [0, 1] (0.0 when n == 0);
        ``per_type`` is empty without ``answer_types``.
    """
    if len(preds) != len(answers_list):
        raise ValueError(f"{len(preds)} predictions but {len(answers_list)} answer entries")
    if answer_types is not None and len(answer_types) != len(preds):
        raise ValueError(f"{len(answer_types)} answer types for {len(preds)} predictions")
    em = [exact_match(p, a) for p, a in zip(preds, answers_list, strict=True)]
    soft = [vqa_soft_accuracy(p, a) for p, a in zip(preds, answers_list, strict=True)]

    def summary(idx: Sequence[int]) -> dict[str, Any]:
        n = len(idx)
        return {
            "n": n,
            "exact_match": sum(em[i] for i in idx) / n if n else 0.0,
            "soft_accuracy": sum(soft[i] for i in idx) / n if n else 0.0,
        }

    out = summary(range(len(preds)))
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(answer_types or []):
        groups.setdefault("unknown" if t is None else str(t), []).append(i)
    out["per_type"] = {t: summary(idx) for t, idx in sorted(groups.items())}
    return out


# ----------------------------------------------------------------------------------------------
# Captioning: COCO caption evaluation (pycocoevalcap) with a pure-Python PTB tokenisation
# ----------------------------------------------------------------------------------------------

# Tokens that pycocoevalcap's PTBTokenizer removes after tokenising (its PUNCTUATIONS list). Note
# the bracket names are matched case-sensitively after Stanford's -lowerCase, so "-lrb-" & co. stay.
_PTB_REMOVED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # fmt: skip
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words Stanford's PTBTokenizer splits in two (seen on stanford-corenlp-3.4.1).
_PTB_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                    "gimme": "gim me", "lemme": "lem me"}  # fmt: skip
_PTB_ABBREV = ("mr|mrs|ms|dr|st|mt|jr|sr|co|corp|inc|ltd|vs|etc|prof|gen|rep|sen|gov|ave|blvd|"
               "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")  # fmt: skip
_PTB_TOKEN = re.compile(
    rf"""
    (?P<url>https?://\S+)
  | (?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)
  | (?P<abbr>(?:[^\W\d_]\.){{2,}}|\b(?:{_PTB_ABBREV})\.(?!\w)|\bno\.(?=\s*\d))  # u.s. mr. no. 5
  | (?P<word>[\w@]+(?:(?:[.'/-]|(?<=\d)[,:](?=\d))[\w@]+)*)     # black-and-white 3.5 1,000 o'clock
  | (?P<clitic>'(?:s|m|re|ve|ll|d)(?!\w))                      # a man 's hat
  | (?P<dots>\.{{2,}}|…)
  | (?P<dashes>-{{2,}}|[–—])
  | (?P<marks>[!?]+)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")


def _ptb_tokens(text: str) -> list[str]:
    """Lower-cased Penn-Treebank tokens of one caption (before punctuation removal)."""
    text = text.lower().replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    tokens: list[str] = []
    for m in _PTB_TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind == "word":
            if tok in _PTB_SPLIT_WORDS:
                tokens.extend(_PTB_SPLIT_WORDS[tok].split())
                continue
            c = _CLITIC.match(tok)  # don't -> do n't, it's -> it 's, can't -> ca n't
            tokens.extend(c.groups() if c else (tok,))
        elif kind == "dots":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--")
        elif kind == "other":
            # '"' becomes `` or '' in PTB, both removed; brackets become -lrb- etc. and are kept.
            tokens.append(_PTB_BRACKETS.get(tok, "''" if tok == '"' else tok))
        else:
            tokens.append(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """What pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, ``-preserveLines -lowerCase``,
    then its punctuation filter) returns for one caption, without Java.

    Lower-cases, splits punctuation and clitics off words ("don't" -> "do n't", "dog's" -> "dog 's"),
    keeps abbreviations ("u.s.", "mr."), numbers ("3.5", "1,000") and hyphenated words, then removes
    the tokens in pycocoevalcap's PUNCTUATIONS list. Exact for plain English captions; see
    docs/metrics.md for the handful of rare forms where it can differ.

    >>> ptb_tokenize("A dog's ball, on the grass.")
    "a dog 's ball on the grass"
    """
    return " ".join(t for t in _ptb_tokens(text.replace("\n", " ")) if t not in _PTB_REMOVED)


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-4, ROUGE-L and CIDEr-D, as the COCO caption evaluation computes them.

    Args:
        predictions: {id: generated caption}, one per image.
        references: {id: [reference captions]}; must have the same ids, each with >= 1 caption.

    Returns:
        ``{"bleu4", "rouge_l", "cider", "distinct", "n"}`` on the usual 0-1 scale (CIDEr: 0-10, COCO
        papers print it x100); ``distinct`` is the number of different (tokenised) captions over the
        number of images: a model that falls back on a few frequent captions shows it here first.
        Captions are tokenised with :func:`ptb_tokenize` and scored with pycocoevalcap's ``Bleu(4)``
        (corpus-level, "closest" reference length), ``Rouge()`` (mean sentence ROUGE-L, beta 1.2) and
        ``Cider()`` (CIDEr-D; IDF from the evaluated references, so it needs several images and a
        single image always scores 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        missing = set(references) ^ set(predictions)
        raise ValueError(
            f"predictions and references differ on {len(missing)} id(s), e.g. {next(iter(missing))!r}"
        )
    if not predictions:
        raise ValueError("no captions to score")
    res = {k: [ptb_tokenize(predictions[k])] for k in predictions}
    gts = {k: [ptb_tokenize(r) for r in references[k]] for k in predictions}
    empty = [k for k, refs in gts.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have no reference caption, e.g. {empty[0]!r}")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    scores = {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}
    if not all(math.isfinite(v) for v in scores.values()):
        raise FloatingPointError(f"non-finite caption score: {scores}")
    distinct = len({caption for (caption,) in res.values()}) / len(res)
    return {**scores, "distinct": distinct, "n": len(res)}
