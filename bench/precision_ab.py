"""fp32 vs bf16 training throughput, interleaved in one process: for CPUs shared with other work.

`qvlm bench` measures one precision per run; on a machine whose load changes from minute to minute,
two runs are not comparable. This times `qvlm bench`'s fast recipe for each stage in fp32 and in bf16,
alternating (fp32, bf16, fp32, bf16, ...), and reports each round's ratio and what `auto` chose here.

    python bench/precision_ab.py [--preset offline] [--rounds 2] [--steps 1] [--stage1-batch 32] [--stage2-batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from qvlm import precision
from qvlm.bench import Bench, Recipe, bench_config

RECIPES = {"fp32": {1: Recipe(bf16=False, frozen_bf16=False, math_attention=False),
                    2: Recipe(bf16=False, frozen_bf16=False, math_attention=False)},
           "bf16": {1: Recipe(math_attention=False), 2: Recipe()}}  # as Bench.fast builds them


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="offline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stage1-batch", type=int, default=32)
    p.add_argument("--stage2-batch", type=int, default=8)
    args = p.parse_args(argv)
    device = torch.device("cpu")
    bench = Bench(bench_config(args.preset), device, args.steps, args.warmup,
                  fast_batches=(args.stage1_batch, args.stage2_batch))
    result = {"cpu": precision.cpu_model_name(), "threads": torch.get_num_threads(),
              "auto": precision.explain("auto", device), "stages": {}}
    for stage, measure in ((1, bench.stage1), (2, bench.stage2)):
        rounds = []
        for _ in range(args.rounds):
            rate = {name: measure(recipes[stage])["samples_per_s"] for name, recipes in RECIPES.items()}
            rounds.append({**rate, "bf16_over_fp32": rate["bf16"] / rate["fp32"]})
            print(f"stage {stage}: {rounds[-1]}", flush=True)  # as it goes: a busy machine may cut the run short
        result["stages"][f"stage{stage}"] = {
            "rounds": rounds, "median_bf16_over_fp32": statistics.median(r["bf16_over_fp32"] for r in rounds)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
