#!/usr/bin/env bash
# The article's training recipe (`paper`) against ours (`paper-plus`) on one small run: stage 2 on
# easy-VQA with the `offline` preset's backbones, two seeds each, from one shared stage-1 model. Only the
# optimiser and schedule differ (the settings the two presets differ in and a small run can show):
#   faithful: AdamW betas (0.9, 0.999), decay 0.01 on every tensor, transformers' cosine from 0 to 0
#   plus:     AdamW betas (0.9, 0.98), decay 0.01 on matrices only, warm-up + cosine to 10%
# Both: warm-up 10 steps, clip 1.0, bf16, batch 16, 400 training images (4,335 records), validation
# (loss on 239 records of 20 images, VQA exact match on 4 batches) every 15 steps.
#
#   bash bench/paper_vs_plus.sh [OUT_DIR]    (default ./bench-paper-vs-plus; needs `qvlm fetch` and the
#                                             easy-vqa package: pip install 'qvlm[demo]')
# Environment: STEPS (stage-2 steps per run, default 60), SEEDS (default "0 1").
# Writes OUT_DIR/summary.md: the validation curve of each run and the mean of the seeds.
set -euo pipefail
OUT=${1:-bench-paper-vs-plus}
STEPS=${STEPS:-60}
SEEDS=${SEEDS:-0 1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT" && cd "$OUT"

[ -f data/train.jsonl ] || qvlm data easyvqa --out data
subset() {  # the records of the first $2 images of manifest $1, into $3
    python3 - "$@" <<'PY'
import json, sys
src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen, out = set(), []
for line in open(src):
    image = json.loads(line)["image"]
    if image not in seen:
        if len(seen) == n:
            break
        seen.add(image)
    out.append(line)
open(dst, "w").writelines(out)
PY
}
subset data/train.jsonl 400 data/train400.jsonl
subset data/val.jsonl 20 data/val20.jsonl

[ -d s1/model ] || qvlm train stage1 --preset offline --data data/train400.jsonl --val data/val20.jsonl --out s1 \
    --set stage1.max_steps=100 --set stage1.epochs=1000 --set train.eval_every=100

common=(--preset offline --data data/train400.jsonl --val data/val20.jsonl --init s1
        --set stage2.max_steps="$STEPS" --set stage2.epochs=1000 --set stage2.warmup_steps=10
        --set stage2.weight_decay=0.01 --set stage2.mixed_precision=bf16
        --set train.eval_every=15 --set train.save_every=100000)
faithful=(--set "stage2.adam_betas=[0.9, 0.999]" --set stage2.decay_scope=all --set stage2.schedule=hf_cosine)
plus=(--set "stage2.adam_betas=[0.9, 0.98]" --set stage2.decay_scope=matrices --set stage2.schedule=warmup_cosine)
for seed in $SEEDS; do
    for recipe in faithful plus; do
        [ -d "s2-$recipe-$seed/model" ] && continue
        if [ "$recipe" = faithful ]; then args=("${faithful[@]}"); else args=("${plus[@]}"); fi
        qvlm train stage2 "${common[@]}" "${args[@]}" --set train.seed="$seed" --out "s2-$recipe-$seed"
    done
done

python3 - <<'PY' > summary.md
import glob, json, statistics
runs = {}
for path in sorted(glob.glob("s2-*/metrics.jsonl")):
    name = path.split("/")[0][3:]
    runs[name] = [r for r in map(json.loads, open(path)) if r.get("stage") == "stage2" and "val_loss" in r]
steps = sorted({r["step"] for rows in runs.values() for r in rows})
print("| run | " + " | ".join(f"val_loss @{s}" for s in steps) + " | val_vqa_accuracy (last) |")
print("|---" * (len(steps) + 2) + "|")
for name, rows in runs.items():
    by_step = {r["step"]: r for r in rows}
    cells = [f"{by_step[s]['val_loss']:.4f}" if s in by_step else "" for s in steps]
    print(f"| {name} | " + " | ".join(cells) + f" | {rows[-1].get('val_vqa_accuracy', '')} |")
for recipe in ("faithful", "plus"):
    seeds = [rows for name, rows in runs.items() if name.startswith(recipe)]
    means = [[r["val_loss"] for rows in seeds for r in rows if r["step"] == s] for s in steps]
    print(f"| {recipe} (mean) | " + " | ".join(f"{statistics.mean(m):.4f}" if m else "" for m in means) + " | |")
PY
cat summary.md
