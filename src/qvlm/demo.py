"""`qvlm demo`: the whole pipeline, offline, on a CPU, in one command.

    fetch the offline bundle -> easy-VQA manifests -> feature cache -> stage 1 -> stage 2
    -> evaluate on easy-VQA's test split -> report -> how to use the model

The trained model is an ordinary run folder (`OUT/run`) that every other command accepts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from qvlm.config import QVLMConfig, get_preset


@dataclass
class DemoPlan:
    """How much of easy-VQA to use and how long to train (each mode documented in docs/BENCHMARKS.md)."""

    train_images: int | None  # None: all 3,600 training images
    stage1_steps: int
    stage2_steps: int
    stage2_batch_size: int
    eval_questions: int  # a fixed subset: the first N questions of test.jsonl
    eval_images: int  # images for the retrieval numbers
    eval_every: int  # validation during training, in steps
    minutes: float | None  # the wall-time budget without --minutes (None: every planned step)


# How a time budget is shared (`--minutes`): stage 1's steps get this share, evaluation and the report
# are kept this share, and stage 2 gets what remains once stage 1 is done. The default plan's parts took
# 36% (set-up, feature cache, stage 1), 43% (stage 2) and 21% (2,000 questions) of its 8 minutes on the
# 2-core Xeon in fp32; with 1,000 questions the evaluation needs less than 15% of 15 minutes even on a CPU
# twice as slow (docs/BENCHMARKS.md, "the default demo keeps to 15 minutes").
STAGE1_SHARE = 0.35
EVAL_SHARE = 0.15


PLANS = {
    "smoke": DemoPlan(train_images=24, stage1_steps=3, stage2_steps=3, stage2_batch_size=4, eval_questions=16,
                      eval_images=16, eval_every=3, minutes=None),
    # stage 2 at batch 8: the yes/no comparison is learned after about as many steps as at 16 (130-200),
    # each step costs about half as much (docs/BENCHMARKS.md, "seventh look"). 15 minutes: the plan takes
    # ~8 on a 2-core CPU with AMX or in fp32 there; only a CPU about twice as slow trains fewer steps
    "default": DemoPlan(train_images=None, stage1_steps=130, stage2_steps=240, stage2_batch_size=8,
                        eval_questions=1000, eval_images=500, eval_every=240, minutes=15),
    "full": DemoPlan(train_images=None, stage1_steps=300, stage2_steps=3600, stage2_batch_size=16,
                     eval_questions=9673, eval_images=1000, eval_every=600, minutes=None),
}


def demo_config(plan: DemoPlan, mode: str, seed: int = 0, overrides: list[str] = ()) -> QVLMConfig:
    """The offline preset with the plan's steps, answering behind its own description of the image
    (`lm.describe_first`: easy-VQA's yes/no questions are learned in ~150 steps instead of ~400 or never,
    docs/BENCHMARKS.md); `overrides` (`--set`) come last and win."""
    small = ["stage1.batch_size=8"] if mode == "smoke" else []
    return get_preset("offline").override(small + ["lm.describe_first=true",
        f"stage2.batch_size={plan.stage2_batch_size}",
        f"stage1.max_steps={plan.stage1_steps}", "stage1.epochs=1000",
        f"stage2.max_steps={plan.stage2_steps}", "stage2.epochs=1000",
        "train.log_every=10", f"train.eval_every={plan.eval_every}",
        f"train.save_every={max(50, plan.stage2_steps // 4)}", f"train.seed={seed}",
    ] + list(overrides))


def _subset(manifest: Path, out: Path, max_images: int | None) -> Path:
    """The records of the first `max_images` distinct images of a manifest (all when None)."""
    if max_images is None:
        return manifest
    kept, seen = [], []
    for line in manifest.read_text().splitlines():
        image = json.loads(line)["image"]
        if image not in seen:
            if len(seen) == max_images:
                break
            seen.append(image)
        kept.append(line)
    out.write_text("\n".join(kept) + "\n")
    return out


def run_demo(out: Path, mode: str = "default", seed: int = 0, overrides: list[str] = (),
             minutes: float | None = None) -> dict:
    """The whole pipeline; with a budget (`minutes`, else the plan's), each stage's steps are cut to what
    fits this machine; `minutes=0` trains every planned step."""
    from qvlm.bundle import fetch
    from qvlm.data.bundled import build_easyvqa
    from qvlm.data.records import load_records
    from qvlm.eval.baselines import prior_baseline
    from qvlm.eval.evaluate import evaluate_retrieval, evaluate_vqa, write_report
    from qvlm.models.vlm import QVLM
    from qvlm.train.trainer import train

    plan = PLANS[mode]
    minutes = plan.minutes if minutes is None else minutes
    config = demo_config(plan, mode, seed, overrides)  # a bad --set fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}
    if minutes:
        _say_plan(minutes, config)
    _say("1/6 offline model bundle (downloaded and converted once, then cached)")
    fetch()
    budget_started = time.perf_counter()  # a first run's download does not eat into training

    _say("2/6 easy-VQA manifests")
    data = out / "data"
    if not (data / "test.jsonl").is_file():
        build_easyvqa(data)
    train_manifest = _subset(data / "train.jsonl", data / f"train-{mode}.jsonl", plan.train_images)
    val_manifest = _subset(data / "val.jsonl", data / f"val-{mode}.jsonl", 32 if mode == "smoke" else 100)

    config.train.feature_cache = str(out / "cache")
    _say("3/6 stage 1: align the Q-Former with captions (ITC + ITG), features cached")
    t = time.perf_counter()
    if minutes:
        config.stage1.time_budget_s = STAGE1_SHARE * minutes * 60
    train(config, 1, str(train_manifest), out / "stage1", val=str(val_manifest), resume=True)
    timings["stage1_s"] = time.perf_counter() - t

    _say("4/6 stage 2: adapter + LoRA on captions and questions")
    t = time.perf_counter()
    if minutes:  # what stage 1 and the set-up left, less the evaluation's share
        left = (1 - EVAL_SHARE) * minutes * 60 - (time.perf_counter() - budget_started)
        config.stage2.time_budget_s = max(60.0, left)
    train(config, 2, str(train_manifest), out / "run", val=str(val_manifest), init=out / "stage1", resume=True)
    timings["stage2_s"] = time.perf_counter() - t
    _merge_logs(out / "stage1" / "metrics.jsonl", out / "run" / "metrics.jsonl")

    _say("5/6 evaluation on easy-VQA's test split")
    model = QVLM.from_pretrained(out / "run")
    test_records = load_records(data / "test.jsonl")
    t = time.perf_counter()
    vqa = evaluate_vqa(model, test_records, batch_size=32, limit=plan.eval_questions, cache=out / "cache",
                       max_new_tokens=4)
    # easy-VQA has 24 distinct captions: any image with the same caption is a correct match
    retrieval = evaluate_retrieval(model, test_records, cache=out / "cache", limit=plan.eval_images,
                                   match="caption")
    # what answering from the question's wording alone scores on the same questions (no image)
    prior, _ = prior_baseline(load_records(train_manifest), test_records, limit=plan.eval_questions)
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    _say("6/6 report")
    report = write_report(model, out / "run", test_records[:200], max_new_tokens=12)
    summary = {"mode": mode, "minutes": minutes, "vqa": {k: vqa[k] for k in ("n", "exact_match", "per_type")},
               "question_prior": {k: prior[k] for k in ("n", "exact_match", "per_type")},
               "retrieval": {k: retrieval[k] for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "n_images")},
               "timings": {k: round(v, 1) for k, v in timings.items()},
               "report": {k: str(v) for k, v in report.items()}}
    (out / "run" / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, vqa, model, out)
    return summary


def _merge_logs(stage1_log: Path, run_log: Path) -> None:
    """Put stage 1's log lines in front of stage 2's, so the run's loss plot shows both stages."""
    if stage1_log.is_file() and run_log.is_file() and '"stage1"' not in run_log.read_text()[:200]:
        run_log.write_text(stage1_log.read_text() + run_log.read_text())


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _say_plan(minutes: float, config: QVLMConfig) -> None:
    stage1 = STAGE1_SHARE * minutes
    stage2 = (1 - STAGE1_SHARE - EVAL_SHARE) * minutes
    print(f"time plan: at most about {minutes:g} minutes on this machine: set-up and feature cache, then stage 1 "
          f"(at most {config.stage1.max_steps} steps, cut to fit ~{stage1:.1f} min), stage 2 (at most "
          f"{config.stage2.max_steps} steps in what remains, ~{stage2:.1f} min), evaluation and report "
          f"(~{EVAL_SHARE * minutes:.1f} min). Each stage times its first steps and trains what fits; "
          "--minutes 0 trains every planned step.", flush=True)


def _print_summary(summary: dict, vqa: dict, model, out: Path) -> None:
    r, v, t = summary["retrieval"], summary["vqa"], summary["timings"]
    print("\n" + "=" * 64)
    print(f"easy-VQA test, {v['n']} questions:  accuracy {100 * v['exact_match']:.1f}%")
    for kind, s in sorted(v["per_type"].items()):
        print(f"    {kind:<8} {100 * s['exact_match']:5.1f}%  ({s['n']} questions)")
    prior = summary["question_prior"]
    print(f"    (answering from the question alone, never looking: {100 * prior['exact_match']:.1f}%, yes/no "
          f"{100 * prior['per_type'].get('yes/no', {}).get('exact_match', 0):.1f}%; `qvlm eval --baseline prior`)")
    print(f"retrieval on {r['n_images']} test images:  image->text R@1 {100 * r['i2t_r1']:.1f}%  "
          f"R@5 {100 * r['i2t_r5']:.1f}%   text->image R@1 {100 * r['t2i_r1']:.1f}%  R@5 {100 * r['t2i_r5']:.1f}%")
    print(f"time: stage 1 {t['stage1_s']:.0f} s, stage 2 {t['stage2_s']:.0f} s, eval {t['eval_s']:.0f} s; "
          f"{t['total_s'] / 60:.1f} min in all")
    print("\nsamples:")
    for p in vqa["predictions"][:6]:
        print(f"  {Path(p['image']).name:>10}  Q: {p['question']:<36} A: {p['prediction']:<10} "
              f"(truth: {p['answers'][0]})")
    print("\nreport:", ", ".join(summary["report"].values()))
    run = out / "run"
    print("\nnext:")
    print(f"  qvlm caption {run} path/to/image.png")
    print(f"  qvlm ask {run} path/to/image.png \"what color is the shape?\"")
    print(f"  qvlm serve {run}     # web page + OpenAI-compatible API on http://127.0.0.1:8000")
