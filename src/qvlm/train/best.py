"""The best model so far by one validation metric (`train.keep_best`), kept in RUN/best next to RUN/model."""

from __future__ import annotations

import json
from pathlib import Path

from qvlm.config import ConfigError
from qvlm.errors import QVLMError
from qvlm.extras import require

# What `trainer.validate` reports, by stage (stage 2's generation scores only for the kinds of sample
# the validation data holds).
VAL_METRICS = {1: ("val_loss", "val_r1"), 2: ("val_loss", "val_vqa_accuracy", "val_caption_cider",
                                          "val_caption_bleu4")}


def keep_best(metric: str | None, out: Path, stage: int, has_val: bool, resume: bool) -> BestModel | None:
    """The keeper for `train.keep_best` (None when off), checked before any training work."""
    if metric is None:
        return None
    if metric not in VAL_METRICS[stage]:
        raise QVLMError(f"train.keep_best={metric!r} is no stage-{stage} validation metric; choose one of "
                        f"{', '.join(VAL_METRICS[stage])}")
    if not has_val:
        raise QVLMError(f"train.keep_best={metric!r} needs validation data: pass --val, or "
                        "--set train.keep_best=null to keep only the last model")
    if metric.startswith("val_caption"):
        require("pycocoevalcap", f"train.keep_best={metric!r}")  # it scores the captions
    return BestModel(metric, out / "best", resume)


class BestModel:
    """Keeps the model with the best value of one validation metric in `folder` (`train.keep_best`).

    Metrics named *loss are better lower, the others (accuracy, R@1, CIDEr) higher. `best.json` beside
    the weights records the metric, its value and the step, so a resumed run keeps comparing with it.
    """

    RECORD = "best.json"

    def __init__(self, metric: str, folder: Path, resume: bool):
        self.metric, self.folder = metric, folder
        self.lower_is_better = metric.endswith("loss")
        record = folder / self.RECORD
        self.value = json.loads(record.read_text())["value"] if resume and record.is_file() else None

    def update(self, model, metrics: dict, step: int) -> bool:
        """Save `model` if `metrics[self.metric]` beats the best so far; True when it did."""
        if self.metric not in metrics:
            raise ConfigError(f"train.keep_best={self.metric!r} is not among this validation's metrics "
                              f"({', '.join(sorted(k for k in metrics if k.startswith('val_')))})")
        value = metrics[self.metric]
        if self.value is not None and (value >= self.value if self.lower_is_better else value <= self.value):
            return False
        model.save_pretrained(self.folder)
        (self.folder / self.RECORD).write_text(json.dumps({"metric": self.metric, "value": value,
                                                           "step": step}) + "\n")
        self.value = value
        return True
