"""Evaluation: metric functions (``qvlm.eval.metrics``) and report files (``qvlm.eval.report``).

The metric functions are re-exported here. The report functions load matplotlib, so they are
imported on first use (``from qvlm.eval import write_gallery`` works, but ``import qvlm.eval`` stays
fast for the CLI).
"""

from __future__ import annotations

from typing import Any

from .metrics import (
    caption_scores,
    exact_match,
    normalize_answer,
    positives_from_groups,
    ptb_tokenize,
    recall_at_k,
    vqa_scores,
    vqa_soft_accuracy,
)

_REPORT_NAMES = ("plot_loss_curves", "plot_similarity_grid", "write_gallery", "read_metrics_log")

__all__ = [
    "caption_scores",
    "exact_match",
    "normalize_answer",
    "positives_from_groups",
    "ptb_tokenize",
    "recall_at_k",
    "vqa_scores",
    "vqa_soft_accuracy",
    *_REPORT_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _REPORT_NAMES:
        from . import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
