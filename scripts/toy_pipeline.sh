#!/usr/bin/env bash
# The whole toy world end to end on a CPU: set up, data, teacher, toy LM, stage 1, stage 2, the
# degrade enhancer and the prior over z (flow matching), then captions and regenerated images of
# val images, the metrics table, the table of the enhancer on corrupted val images, and image-caption
# pairs drawn from the prior (a grid of 16 and the joint-generation table). The recipe is `--preset toy`
# (common.PRESETS); precision is each stage's --mixed_precision auto (bf16 only where the CPU has it
# natively), or MIXED_PRECISION=no|bf16 for all of them.
# Re-running reuses what is on disk (data, teacher, LM) and resumes the training stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/toy}
PRECISION=(--mixed_precision "${MIXED_PRECISION:-auto}")

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, diffusers, transformers, pycocoevalcap" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python
source scripts/timed.sh

[ -f "$OUT/data/annotations/captions_val2017.json" ] || \
  timed "toy world" $PY -m data.toy_world --output_dir "$OUT/data"
[ -f "$OUT/teacher/model_index.json" ] || \
  timed "teacher (text-to-image)" $PY -m scripts.train_toy_teacher --preset toy --data_dir "$OUT/data" \
    --output_dir "$OUT/teacher" --resume_from latest "${PRECISION[@]}"
[ -f "$OUT/lm/config.json" ] || \
  timed "toy LM" $PY -m scripts.train_toy_lm --data_dir "$OUT/data" --output_dir "$OUT/lm" \
    --resume_from latest "${PRECISION[@]}"
timed "stage 1 (distillation)" $PY train_stage1.py --preset toy --data_dir "$OUT/data" \
  --sd_model_id "$OUT/teacher" --output_dir "$OUT/stage1" --resume_from latest "${PRECISION[@]}"
timed "stage 2 (captioner)" $PY train_stage2.py --preset toy --data_dir "$OUT/data" --llm "$OUT/lm" \
  --stage1_ckpt "$OUT/stage1" --output_dir "$OUT/stage2" --resume_from latest "${PRECISION[@]}"
for mode in degrade prior; do  # the cheap flows: they train on cached z
  timed "flow: $mode" $PY train_flowmatching.py --preset toy --mode $mode --data_dir "$OUT/data" \
    --stage1_ckpt "$OUT/stage1" --stage2_ckpt "$OUT/stage2" --output_dir "$OUT/flow_$mode" \
    --resume_from latest "${PRECISION[@]}"
done
timed "captions + regenerations + metrics" $PY eval_captioning.py --stage1_ckpt "$OUT/stage1" \
  --stage2_ckpt "$OUT/stage2" --data_dir "$OUT/data" --split val --metrics bleu,meteor,rouge,cider \
  --out_jsonl "$OUT/eval/preds.jsonl" --regen --num_inference_steps 20 --guidance_scale 2.0 --batch_size 50

timed "enhancer table (benchmarks.enhance_degrade)" $PY -m benchmarks.enhance_degrade --run "$OUT" \
  --val_world 1000 > "$OUT/eval/enhance_degrade.md"

timed "joint generation (benchmarks.generator)" $PY -m benchmarks.generator --run "$OUT" \
  > "$OUT/eval/generator.md"

echo
cat "$OUT/eval/enhance_degrade.md"
echo
cat "$OUT/eval/generator.md"
echo
$PY -c "import common; print(common.machine_description())"
echo "| toy stage | wall seconds |"
echo "|---|---|"
printf '%s\n' "${TIMES[@]}"
echo
echo "captions: $OUT/eval/preds.jsonl   scores: $OUT/eval/preds.scores.json"
echo "images with captions and regenerations: $OUT/eval/preds.sheet.png"
echo "stage-1 original | reconstruction grids: $OUT/stage1/reconstructions_*.png"
echo "16 image-caption pairs drawn from the prior: $OUT/eval/generated_pairs.png"
