"""`qvlm bench`: throughput at a preset's real sizes (random weights, no download), ours vs the baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvlm.config import PRESETS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="training / extraction / generation throughput, optionally vs the reference recipe",
        description=__doc__ + " See the module docstring of qvlm.bench for what each mode does.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help=f"{' | '.join(PRESETS)} (default: paper)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also run the reference recipe's way (per-sample encoder, batch 8, bf16 LM, no cache)")
    p.add_argument("--ablate", action="store_true",
                   help="also measure the fast mode with each fast path turned off alone")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the fast mode's training step, as train.compile=true (compile time "
                        "reported apart)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--stage1-batch", type=int, help="fast-mode stage-1 batch (default 64 CPU / 256 CUDA)")
    p.add_argument("--stage2-batch", type=int, help="fast-mode stage-2 batch (default 16 CPU / 64 CUDA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as for `qvlm train`; the fast mode trains each stage in its "
                        "stageN.mixed_precision (auto | fp32 | bf16), e.g. --set stage2.mixed_precision=fp32")
    p.add_argument("--json-out", type=Path, help="write all figures as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from qvlm.bench import bench_config, format_table, run_bench

    config = bench_config(args.preset, args.overrides)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = run_bench(config, device, args.compare_baseline, args.steps, args.warmup,
                       args.stage1_batch, args.stage2_batch, args.ablate, args.compile)
    print(format_table(result))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
