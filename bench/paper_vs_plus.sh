#!/usr/bin/env bash
# The article's training recipe (`paper`) against ours (`paper-plus`), one departure at a time, on small
# runs with the `offline` preset's backbones on easy-VQA, two seeds each: validation curves, so each of our
# changes is shown against the faithful setting it replaces.
#
# Stage 2 (from one shared stage-1 model, 60 steps, 400 training images, validation every 15 steps):
#   faithful  AdamW betas (0.9, 0.999), decay 0.01 on every tensor, transformers' cosine from 0 to 0
#   plus      AdamW betas (0.9, 0.98), decay 0.01 on matrices only, warm-up + cosine to 10%
#   layout    faithful with the article's prompt: a system turn, the image after the user turn
#   (all three: warm-up 10 steps, clip 1.0, bf16, batch 16, the image inside the user turn but in `layout`)
# Decoding: each stage-2 model answers the validation questions greedily and with the article's sampling
#   (temperature 0.7, top-p 0.9, repetition penalty 1.2).
# Stage 1 (from the backbones, 60 steps, batch 64, validation every 15 steps):
#   faithful  torch Adam, no decay, constant lr, no warm-up, no clipping, fp32
#   clip      faithful + clipping at 1.0
#   bf16      faithful + bf16 autocast (what `auto` picks where bf16 is measured faster)
#   adamw     faithful + AdamW (0.9, 0.98), decay 0.05 on matrices, 20 warm-up steps + cosine to 10%
#   plus      all three: the `offline` / `paper-plus` stage 1
#
#   bash bench/paper_vs_plus.sh [OUT_DIR]    (default ./bench-paper-vs-plus; needs `qvlm fetch` and the
#                                             easy-vqa package: pip install 'qvlm[demo]')
# Environment: STEPS (stage-2 steps per run, default 60), STEPS1 (stage-1 steps, default 60), SEEDS
# (default "0 1"), RECIPES2 (default "faithful plus layout"), RECIPES1 (default "faithful clip bf16 adamw
# plus"; empty skips the stage-1 comparison). Runs already in OUT_DIR are kept, not trained again.
# Writes OUT_DIR/summary.md: the validation curve of each run, the mean of the seeds, and the decoding table.
set -euo pipefail
OUT=${1:-bench-paper-vs-plus}
STEPS=${STEPS:-60}
STEPS1=${STEPS1:-60}
SEEDS=${SEEDS:-0 1}
RECIPES2=${RECIPES2-faithful plus layout}
RECIPES1=${RECIPES1-faithful clip bf16 adamw plus}
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

[ -z "$RECIPES2" ] || [ -d s1/model ] || qvlm train stage1 --preset offline --data data/train400.jsonl --val data/val20.jsonl --out s1 \
    --set stage1.max_steps=100 --set stage1.epochs=1000 --set train.eval_every=100

common=(--preset offline --data data/train400.jsonl --val data/val20.jsonl --init s1
        --set stage2.max_steps="$STEPS" --set stage2.epochs=1000 --set stage2.warmup_steps=10
        --set stage2.weight_decay=0.01 --set stage2.mixed_precision=bf16
        --set train.eval_every=15 --set train.save_every=100000)
# One array per recipe: s2_<name> for stage 2, s1_<name> for stage 1.
s2_faithful=(--set "stage2.adam_betas=[0.9, 0.999]" --set stage2.decay_scope=all --set stage2.schedule=hf_cosine)
s2_plus=(--set "stage2.adam_betas=[0.9, 0.98]" --set stage2.decay_scope=matrices --set stage2.schedule=warmup_cosine)
s2_layout=("${s2_faithful[@]}" --set lm.image_position=after_turn
           --set "lm.system_prompt=Answer the user's question truthfully")
s1_faithful=(--set stage1.optimizer=adam --set "stage1.adam_betas=[0.9, 0.999]" --set stage1.weight_decay=0
             --set stage1.schedule=constant --set stage1.warmup_steps=0 --set stage1.grad_clip=null
             --set stage1.mixed_precision=fp32)
adamw=(--set stage1.optimizer=adamw --set "stage1.adam_betas=[0.9, 0.98]" --set stage1.weight_decay=0.05
       --set stage1.schedule=warmup_cosine --set stage1.warmup_steps=20)
s1_clip=("${s1_faithful[@]}" --set stage1.grad_clip=1.0)
s1_bf16=("${s1_faithful[@]}" --set stage1.mixed_precision=bf16)
s1_adamw=("${s1_faithful[@]}" "${adamw[@]}")
s1_plus=("${s1_adamw[@]}" --set stage1.grad_clip=1.0 --set stage1.mixed_precision=bf16)
for recipe in $RECIPES2; do [ -v "s2_$recipe" ] || { echo "unknown stage-2 recipe $recipe" >&2; exit 2; }; done
for recipe in $RECIPES1; do [ -v "s1_$recipe" ] || { echo "unknown stage-1 recipe $recipe" >&2; exit 2; }; done

for seed in $SEEDS; do
    for recipe in $RECIPES2; do
        [ -d "s2-$recipe-$seed/model" ] && continue
        declare -n args="s2_$recipe"
        qvlm train stage2 "${common[@]}" "${args[@]}" --set train.seed="$seed" --out "s2-$recipe-$seed"
    done
    for recipe in $RECIPES1; do
        [ -d "s1-$recipe-$seed/model" ] && continue
        declare -n args="s1_$recipe"
        qvlm train stage1 --preset offline --data data/train400.jsonl --val data/val20.jsonl \
            "${args[@]}" --set stage1.max_steps="$STEPS1" --set stage1.epochs=1000 --set train.eval_every=15 \
            --set train.save_every=100000 --set train.seed="$seed" --out "s1-$recipe-$seed"
    done
done
for run in s2-*/; do
    [ -d "$run" ] || continue  # no stage-2 runs: the glob stays as written
    run=${run%/}
    for decoding in greedy sampled; do
        [ -f "$run/eval/vqa-$decoding.json" ] && continue
        if [ $decoding = greedy ]; then flags=(--greedy); else flags=(--temperature 0.7 --top-p 0.9 --repetition-penalty 1.2); fi
        qvlm eval "$run" --data data/val20.jsonl --task vqa --max-new-tokens 16 "${flags[@]}" \
            --json-out "$run/eval/vqa-$decoding.json" > /dev/null
    done
done

python3 - <<'PY' > summary.md
import glob, json, statistics


def curves(prefix, stage, metric):
    """{run name: {step: value}} of one validation metric, for the runs s1-* or s2-*."""
    runs = {}
    for path in sorted(glob.glob(f"{prefix}-*/metrics.jsonl")):
        rows = [r for r in map(json.loads, open(path)) if r.get("stage") == stage and metric in r]
        runs[path.split("/")[0][len(prefix) + 1:]] = {r["step"]: r[metric] for r in rows}
    return runs


def table(title, runs, metric):
    steps = sorted({s for by_step in runs.values() for s in by_step})
    print(f"\n### {title}\n\n| run | " + " | ".join(f"{metric} @{s}" for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for name, by_step in runs.items():
        print(f"| {name} | " + " | ".join(f"{by_step[s]:.4f}" if s in by_step else "" for s in steps) + " |")
    for recipe in dict.fromkeys(name.rsplit("-", 1)[0] for name in runs):
        seeds = [by_step for name, by_step in runs.items() if name.rsplit("-", 1)[0] == recipe]
        means = [[by_step[s] for by_step in seeds if s in by_step] for s in steps]
        print(f"| {recipe} (mean) | " + " | ".join(f"{statistics.mean(m):.4f}" if m else "" for m in means) + " |")


for title, prefix, stage, metric in [("Stage 2: validation loss", "s2", "stage2", "val_loss"),
                                     ("Stage 1: validation loss", "s1", "stage1", "val_loss"),
                                     ("Stage 1: validation R@1 (in batches)", "s1", "stage1", "val_r1")]:
    runs = curves(prefix, stage, metric)
    if runs:
        table(title, runs, metric)
evaluated = sorted(glob.glob("s2-*/eval"))
if evaluated:
    print("\n### Decoding: exact match on the validation questions\n\n| run | greedy | article sampling |\n|---|---:|---:|")
for run in evaluated:
    scores = [json.load(open(f"{run}/vqa-{d}.json"))["exact_match"] for d in ("greedy", "sampled")]
    print(f"| {run.split('/')[0][3:]} | " + " | ".join(f"{x:.1%}" for x in scores) + " |")
PY
cat summary.md
