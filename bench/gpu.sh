#!/usr/bin/env bash
# The GPU speed check of issue 9, at the `paper` sizes, in well under 8 minutes on one GPU.
#
#   bash bench/gpu.sh [OUT_DIR]      (needs torch with CUDA and `pip install -e .` done)
#
# Measures, side by side in one process: feature extraction, stage-1 and stage-2 training (qvlm's fast
# recipe vs the article's baseline recipe, and each fast path turned off alone), generation latency and
# tokens/s, counted TFLOP/s and model FLOPs utilisation, peak GPU memory, the projected wall time
# of the reference recipe (extraction + 10 + 5 epochs on 50k pairs), and the gain from torch.compile.
# Writes JSON and prints the tables.
# Random weights at the real sizes; only SmolLM2's tokenizer is read from the offline bundle, so run
# `qvlm fetch` once first (or copy $QVLM_CACHE/bundle from a machine that has it, on a GPU box without
# internet). Record the printed card name with the numbers in docs/BENCHMARKS.md.
set -euo pipefail
out="${1:-bench-gpu}"
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script measures the GPU path"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
export PYTHONUNBUFFERED=1
# paper sizes: fast vs baseline, plus what each fast path is worth
qvlm bench --preset paper --device cuda --compare-baseline --ablate --steps 10 --warmup 3 \
    --json-out "$out/paper.json" | tee "$out/paper.txt"
# the same with torch.compile (train.compile=true), its compile time printed apart
qvlm bench --preset paper --device cuda --compile --steps 10 --warmup 3 \
    --json-out "$out/paper-compile.json" | tee "$out/paper-compile.txt"
# larger fast batches, to find where throughput stops growing (the fast mode reports its batch)
qvlm bench --preset paper --device cuda --stage1-batch 512 --stage2-batch 128 --steps 10 --warmup 3 \
    --json-out "$out/paper-large-batch.json" | tee "$out/paper-large-batch.txt"
