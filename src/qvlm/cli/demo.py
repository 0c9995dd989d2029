"""`qvlm demo`: fetch, data, both training stages, evaluation and report, offline on a CPU."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline on easy-VQA, offline, on CPU",
        description="Fetch the offline bundle, write easy-VQA manifests, train stage 1 and stage 2, "
        "evaluate on the test split and write the report. The model ends up in OUT/run. "
        "Re-running continues where an interrupted demo stopped.")
    p.add_argument("--out", default="qvlm-demo", help="output folder (default: ./qvlm-demo)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="a few dozen samples and steps (CI, ~2 min)")
    size.add_argument("--full", action="store_true", help="the longer run of docs/BENCHMARKS.md (~1 hour)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget: each stage times its first steps and trains only the steps "
                   "that fit (fewer steps, lower accuracy on slow CPUs; default: 15, with --smoke or "
                   "--full none; 0: every planned step)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order, initialisation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field as `qvlm train` does, e.g. --set stage2.mixed_precision=fp32")
    p.set_defaults(func=run)


def run(args) -> int:
    from qvlm.demo import run_demo

    mode = "smoke" if args.smoke else "full" if args.full else "default"
    run_demo(Path(args.out), mode, seed=args.seed, overrides=args.overrides, minutes=args.minutes)
    return 0
