"""The GPU check in one process: `bench/gpu.sh` runs it under a hard time limit.

Parts, in order of value, the figures rewritten to OUT/gpu.json and OUT/gpu.md after each one, so a
run cut short by the time limit still leaves what it measured:
  eager    `qvlm bench` at the preset's sizes, fast recipe vs the article's (--compare-baseline)
  compile  the same fast recipe under torch.compile, compile time apart
  train    a real `qvlm train` stage 1 then stage 2 (--init from it), --train-steps each, on synthetic
           images and captions: catches device bugs the bench's fixed batch cannot (data loading,
           feature cache, checkpoints, the scheduler, saving); losses must stay finite
  ablate   each fast path turned off alone
Each bench part reports samples/s, counted TFLOP/s, MFU (datasheet peak), the fraction of the measured
matmul peak, peak memory and the projected reference recipe (50k pairs, 10 + 5 epochs, extraction).

On a CPU with `--preset tiny` the same code runs in seconds (tests/test_bench.py runs it so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from qvlm.bench import bench_config, format_table, run_bench, synthetic_batch
from qvlm.train.trainer import train

PARTS = ("eager", "compile", "train", "ablate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokenizer", default="bundle:smollm2-135m-instruct",
                   help="the LM tokenizer: a bundle name or a folder with SmolLM2's tokenizer files")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per bench measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=200, help="optimizer steps of each real training stage")
    p.add_argument("--images", type=int, default=512, help="synthetic training images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides for every part (default on CUDA: both stages in bf16)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def environment(device: torch.device) -> dict:
    gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def bench_part(config, device, args, **options) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak memory per part, not since the process began
    result = run_bench(config, device, steps=args.steps, warmup=args.warmup, **options)
    result["table"] = format_table(result)
    return result


def write_dataset(root: Path, n: int, size: int) -> Path:
    """n random images, each with a caption row and a question row: root/train.jsonl."""
    images, captions = synthetic_batch(n, size, seed=4)
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        image.save(root / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "caption": caption})
        rows.append({"image": f"imgs/{i}.png", "question": "what is in the picture?", "answer": caption.split()[1]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def train_part(config, device, args) -> dict:
    """Stage 1 then stage 2 (initialised from it), `args.train_steps` each, the way `qvlm train` runs."""
    steps = args.train_steps
    config = config.override([f"stage1.max_steps={steps}", f"stage2.max_steps={steps}", "stage1.epochs=100000",
                              "stage2.epochs=100000", f"train.save_every={steps}", f"train.log_every={max(1, steps // 20)}"])
    result = {}
    with tempfile.TemporaryDirectory(prefix="qvlm-gpu-check-") as tmp:
        tmp = Path(tmp)
        config.train.feature_cache = str(tmp / "features")
        data = write_dataset(tmp / "data", args.images, size=64)  # the encoder resizes to its own input size
        for stage in (1, 2):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            train(config, stage, str(data), tmp / f"stage{stage}", init=tmp / "stage1" if stage == 2 else None)
            seconds = time.perf_counter() - start
            losses = _losses(tmp / f"stage{stage}")
            if not losses or not all(math.isfinite(x) for x in losses):
                raise RuntimeError(f"stage {stage}: losses not finite: {losses}")
            batch = getattr(config, f"stage{stage}").batch_size * getattr(config, f"stage{stage}").grad_accum
            result[f"stage{stage}"] = {
                "steps": steps, "batch": batch, "wall_s": seconds, "samples_per_s": steps * batch / seconds,
                "first_loss": losses[0], "last_loss": losses[-1],
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return result


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# qvlm GPU check: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}", "",
             f"preset `{result['preset']}`; parts run: {', '.join(p for p in PARTS if p in result)}", ""]
    benches = [p for p in ("eager", "compile", "ablate") if p in result]
    if benches:
        lines += ["| figure | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
        rows = {"stage-1 samples/s": lambda r: r["stage1"]["fast"]["samples_per_s"],
                "stage-2 samples/s": lambda r: r["stage2"]["fast"]["samples_per_s"],
                "stage-2 TFLOP/s (counted)": lambda r: r["stage2"]["fast"]["tflops"],
                "stage-2 MFU": lambda r: r["stage2"]["fast"].get("mfu", math.nan),
                "stage-2 fraction of measured matmul peak": lambda r: r["stage2"]["fast"]["peak_fraction"],
                "stage-1 vs baseline": lambda r: r["stage1"].get("speedup", math.nan),
                "stage-2 vs baseline": lambda r: r["stage2"].get("speedup", math.nan),
                "projected recipe (min)": lambda r: r["projected_hours"]["fast"] * 60,
                "peak memory (GiB)": lambda r: r["peak_memory_gib"]}
        for name, get in rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{get(result[p]):.3g}" for p in benches) + " |")
        lines.append("")
    if "train" in result:
        lines += ["| real training | steps | batch | wall s | samples/s | loss first → last | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for stage, r in result["train"].items():
            memory = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            lines.append(f"| {stage} | {r['steps']} | {r['batch']} | {r['wall_s']:.1f} | {r['samples_per_s']:.1f} "
                         f"| {r['first_loss']:.3f} → {r['last_loss']:.3f} | {memory} |")
        lines.append("")
    for part in benches:
        lines += [f"## {part}", "", "```", result[part]["table"], "```", ""]
    return "\n".join(lines)


def save(result: dict, out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check measures the GPU path (use --device cpu --preset tiny to try it)")
    bf16 = ["stage1.mixed_precision=bf16", "stage2.mixed_precision=bf16"] if device.type == "cuda" else []
    config = bench_config(args.preset, bf16 + args.overrides, tokenizer=args.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"preset": args.preset, "environment": environment(device), "seconds": {}}
    parts = args.parts.split(",")
    runs = {"eager": lambda: bench_part(config, device, args, compare_baseline=True),
            "compile": lambda: bench_part(config, device, args, compare_baseline=False, compile=True),
            "train": lambda: train_part(config, device, args),
            "ablate": lambda: bench_part(config, device, args, compare_baseline=False, ablate=True)}
    for part in (p for p in PARTS if p in parts):
        print(f"== {part}", flush=True)
        start = time.perf_counter()
        result[part] = runs[part]()
        result["seconds"][part] = time.perf_counter() - start
        save(result, args.out)
        print(result[part].get("table", ""), flush=True)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
