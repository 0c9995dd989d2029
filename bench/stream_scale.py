"""Cost grows with work, not data (issue 19): peak RSS and samples/s of a fixed number of training steps
on 10k / 100k / 1M streamed records, against the list path.

Writes synthetic records (a 32×32 PNG + a caption each) into WebDataset shards of 10,000, once per size,
under --root; then, per size and path, runs `qvlm train stage1 --preset tiny` for --steps steps with
online features in a fresh process (`/usr/bin/time -f %M`: peak RSS of the process, DataLoader workers
excluded since num_workers=0) and reads samples/s from the run's metrics.jsonl (the mean of its log
lines after the first). Separately it times decoding + resizing in one process: images/s per worker.

    python bench/stream_scale.py --sizes 10000 100000 [--steps 30] [--paths stream list]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARD = 10_000


def write_shards(folder: Path, records: int) -> str:
    """`records` samples in shards of 10,000 (reused when already written); returns the brace pattern."""
    shards = -(-records // SHARD)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = [_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)]
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w") as tar:
            for i in range(s * SHARD, min(records, (s + 1) * SHARD)):
                # the index in the bytes: every image distinct, as in a real dataset
                image = palette[i % 64] + i.to_bytes(8, "little")
                for ext, data in (("png", image), ("txt", f"synthetic image number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def train_point(pattern: str, path: str, steps: int, work: Path) -> dict:
    """One run of `steps` stage-1 steps; its peak RSS (MiB), wall time and samples/s."""
    out = work / f"run-{path}-{time.time_ns()}"
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "qvlm.cli.main", "train", "stage1", "--preset", "tiny",
           "--data", pattern, "--out", str(out), "--set", f"stage1.max_steps={steps}",
           "--set", "stage1.epochs=1000", "--set", "train.features=online", "--set", "train.log_every=5",
           "--set", f"train.stream={'true' if path == 'stream' else 'false'}", "--set", "train.save_every=100000"]
    env = {**os.environ, "QVLM_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{path} run failed:\n{run.stderr[-3000:]}")
    peak_kib = int(run.stderr.strip().splitlines()[-1])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["samples_per_s"] for m in logs if "samples_per_s" in m][1:]  # the first includes warm-up
    return {"peak_rss_mib": round(peak_kib / 1024), "wall_s": round(wall, 1),
            "samples_per_s": round(sum(rates) / len(rates), 1) if rates else None}


def decode_rate(pattern: str, images: int = 2000) -> float:
    """Images/s decoded and resized by one worker (the online path's per-sample CPU work)."""
    from qvlm.config import get_preset
    from qvlm.data.pipeline import Pixels
    from qvlm.data.stream import epoch_records, open_stream
    from qvlm.models.vision import FrozenVisionEncoder

    pixels = Pixels(FrozenVisionEncoder.build(get_preset("tiny").vision))
    records = epoch_records(open_stream(pattern), 0, 0, 0, 1)
    start, done = time.perf_counter(), 0
    for record in records:
        pixels(record)
        done += 1
        if done == images:
            break
    return round(done / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--paths", nargs="+", default=["stream", "list"], choices=["stream", "list"])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "qvlm-stream-scale")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        pattern = write_shards(args.root / f"n{size}", size)
        for path in args.paths:
            point = {"records": size, "path": path, **train_point(pattern, path, args.steps, args.root)}
            print(json.dumps(point), flush=True)
            rows.append(point)
    print(json.dumps({"decode_resize_images_per_s_per_worker": decode_rate(pattern)}))
    print("\n| records | path | peak RSS (MiB) | samples/s | wall (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['records']:,} | {r['path']} | {r['peak_rss_mib']} | {r['samples_per_s']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
