"""Time budgets (`stage*.time_budget_s`): the plan shrinks to what this machine can do in time."""

import json

import pytest
import torch
from helpers import write_shapes_dataset

from qvlm.config import get_preset
from qvlm.train import budget as budget_module
from qvlm.train.budget import TimeBudget
from qvlm.train.optim import build_schedule, redraw_schedule
from qvlm.train.trainer import train


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(budget: TimeBudget, clock: FakeClock, steps: int, seconds_per_step: float) -> list[int]:
    decisions = []
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        if (total := budget.after_step(step)) is not None:
            decisions.append(total)
    return decisions


def test_budget_cuts_the_plan_to_the_steps_that_fit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    budget = TimeBudget(seconds=100.0, total_steps=500, probe_from=2, probe_steps=8)
    decisions = _run(budget, clock, steps=30, seconds_per_step=0.5)
    assert budget.seconds_per_step == pytest.approx(0.5)
    assert decisions == [200]  # decided once, at step 10: 100 s / 0.5 s per step


def test_budget_keeps_a_plan_that_fits_and_never_cuts_below_the_floor(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget_module.time, "perf_counter", clock)
    assert _run(TimeBudget(seconds=100.0, total_steps=150), clock, steps=30, seconds_per_step=0.5) == [150]
    clock.now = 0.0
    assert _run(TimeBudget(seconds=1.0, total_steps=150, min_steps=20), clock, steps=30,
                seconds_per_step=0.5) == [20]


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


@pytest.mark.parametrize("kind, floor", [("warmup_cosine", 0.1), ("hf_cosine", 0.0), ("constant", 1.0)])
def test_redrawn_schedule_of_every_kind_ends_where_a_schedule_of_the_new_total_does(kind, floor):
    """A time budget cuts 100 planned steps to 20 after step 10: the next 10 steps follow the schedule
    of a 20-step plan (warm-up untouched), whatever the kind."""
    stage = get_preset("tiny").override([f"stage1.schedule={kind}", "stage1.warmup_steps=2"]).stage1
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_schedule(optimizer, stage, total_steps=100)
    before = _lrs(scheduler, optimizer, 10)
    redraw_schedule(scheduler, warmup_steps=2, total_steps=20)
    after = _lrs(scheduler, optimizer, 10)
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    planned = _lrs(build_schedule(fresh, stage, total_steps=20), fresh, 20)
    assert after == pytest.approx(planned[10:])
    assert after[-1] == pytest.approx(floor)  # at step 20 the schedule ends at its floor
    if kind != "constant":
        assert before[-1] > after[0] > after[-1]  # decaying faster than the 100-step plan did


def test_training_over_budget_trains_fewer_steps_and_resume_keeps_the_plan(tmp_path, private_cache):
    data, val = write_shapes_dataset(tmp_path / "shapes")
    # A budget no machine meets: the plan falls to the floor of 20 steps once steps 2..10 are timed.
    config = get_preset("tiny").override(["stage1.max_steps=200", "stage1.epochs=1000",
                                          "stage1.time_budget_s=0.001", "train.save_every=1000"])
    train(config, 1, str(data), tmp_path / "run", val=str(val))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert max(steps) == plan["total_steps"] == 20
    # A resumed run (after a crash, say) continues the same plan instead of the config's 200 steps.
    train(config, 1, str(data), tmp_path / "run", val=str(val), resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20


def test_training_within_budget_keeps_the_plan_and_says_how_long_it_takes(tmp_path, private_cache, capsys):
    data, val = write_shapes_dataset(tmp_path / "shapes")
    config = get_preset("tiny").override(["stage1.max_steps=12", "stage1.epochs=1000",
                                          "stage1.time_budget_s=100000", "train.save_every=1000"])
    train(config, 1, str(data), tmp_path / "run", val=str(val))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 12 and not (tmp_path / "run" / "plan.json").exists()
    assert "the 12 planned steps take ~" in capsys.readouterr().out
