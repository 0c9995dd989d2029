#!/usr/bin/env bash
# The GPU check, in one go under a hard time limit: bench at the `paper` sizes in bf16 (fast recipe vs
# the article's), torch.compile on vs off, counted TFLOP/s, MFU, fraction of the measured matmul peak,
# peak memory, the projected reference recipe, then a real 200-step stage-1 + stage-2 run on synthetic
# data, then each fast path turned off alone. bench/gpu_check.py does the work; its docstring says more.
#
#   bash bench/gpu.sh [OUT_DIR]      (default: $OUT where set, else ./bench-gpu)
#
# Writes OUT_DIR/gpu.json, gpu.md (the table) and gpu.log, rewritten after each part, so a run stopped
# by the limit keeps what it measured. Environment:
#   QVLM_GPU_LIMIT_S  hard limit for the whole check, seconds (default 480)
#   QVLM_TOKENIZER    folder with SmolLM2's tokenizer files; default bench/.tokenizer where present,
#                     else the offline bundle's (`qvlm fetch`). On a GPU box without internet, prepare it
#                     here first and carry bench/.tokenizer along (git ignores it):
#                       mkdir -p bench/.tokenizer && cp ~/.cache/qvlm/bundle/smollm2-135m-instruct/{tokenizer.json,tokenizer_config.json,chat_template.jinja} bench/.tokenizer/
#   PYTHON            interpreter holding torch with CUDA (default python3)
# Installing: nothing is downloaded. The interpreter must already hold torch with CUDA, transformers,
# peft, accelerate, safetensors, tensorboard and pyyaml (a CUDA image with PyTorch usually does; else
# `pip install -e .`); qvlm itself is run from this checkout's src/. Record the card name printed
# first with the numbers in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench-gpu}}"
limit="${QVLM_GPU_LIMIT_S:-480}"
python="${PYTHON:-python3}"
tokenizer="${QVLM_TOKENIZER:-}"
if [[ -z "$tokenizer" ]]; then
    if [[ -f bench/.tokenizer/tokenizer.json ]]; then tokenizer=bench/.tokenizer; else tokenizer=bundle:smollm2-135m-instruct; fi
fi
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script measures the GPU path"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
import accelerate, peft, transformers  # noqa: E401,F401  (fail here, before the timed work, if missing)
PY
# SIGINT first (Python unwinds, the parts done are already on disk), SIGKILL 20 s later if it hangs.
timeout --signal=INT --kill-after=20 "$limit" "$python" bench/gpu_check.py --out "$out" --preset paper \
    --device cuda --tokenizer "$tokenizer" 2>&1 | tee "$out/gpu.log"
