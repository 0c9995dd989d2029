"""Fit a stage's step count to a wall-clock budget (`stage1/2.time_budget_s`), measured on this machine.

The same plan takes 10 minutes on one CPU and 40 on another (bf16 units or not, core count). Rather
than guess, training times its own first steps and, when the planned steps would overrun the budget,
trains fewer: the learning-rate schedule is redrawn over the new total, so warm-up and decay still
happen. The decision is written to RUN/plan.json, so `--resume` continues the same plan.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PLAN_FILE = "plan.json"


class TimeBudget:
    """Times steps `probe_from` .. `probe_from + probe_steps` (the first ones pay for warm-up work) and
    then decides, once, how many steps fit in `seconds` from the start of training."""

    def __init__(self, seconds: float, total_steps: int, probe_from: int = 2, probe_steps: int = 8,
                 min_steps: int = 20):
        self.seconds, self.total_steps, self.min_steps = seconds, total_steps, min_steps
        self.probe_from, self.probe_steps = probe_from, probe_steps
        self.started = time.perf_counter()
        self.probe_start: tuple[int, float] | None = None  # (step, time) where timing began
        self.seconds_per_step: float | None = None

    def after_step(self, step: int) -> int | None:
        """Call after each optimizer step. At the step the probe ends (the same step on every process)
        it returns the steps that fit, at most the plan's; None at every other step."""
        if self.seconds_per_step is not None or step < self.probe_from:
            return None
        now = time.perf_counter()
        if self.probe_start is None:
            self.probe_start = (step, now)
            return None
        first, began = self.probe_start
        if step - first < self.probe_steps:
            return None
        self.seconds_per_step = (now - began) / (step - first)
        fits = step + int((self.seconds - (now - self.started)) / self.seconds_per_step)
        return min(self.total_steps, max(self.min_steps, step + 1, fits))


def save_plan(run: Path, total_steps: int, seconds_per_step: float, budget_s: float) -> None:
    (run / PLAN_FILE).write_text(json.dumps({"total_steps": total_steps, "seconds_per_step":
                                             round(seconds_per_step, 4), "time_budget_s": budget_s}) + "\n")


def planned_total(run: Path) -> int | None:
    """The step count an earlier, budgeted attempt of this run settled on (None: none was cut)."""
    path = run / PLAN_FILE
    return json.loads(path.read_text())["total_steps"] if path.is_file() else None
