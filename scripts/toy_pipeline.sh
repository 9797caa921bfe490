#!/usr/bin/env bash
# The whole toy world end to end on a CPU: set up, data, teacher, toy LM, stage 1, stage 2, then
# captions and regenerated images of val images and the metrics table.
# Re-running reuses what is on disk (data, teacher, LM) and resumes the training stages (the teacher too).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/toy}
TEACHER_STEPS=${TEACHER_STEPS:-800}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, diffusers, transformers, pycocoevalcap" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
fi
PY=.venv/bin/python
# The stages' steps are --preset toy's (common.PRESETS); named here too for the checkpoint paths.
PRESET_STEPS=$($PY -c "import common; t = common.PRESETS['toy']; print(t['stage1']['max_steps'], t['stage2']['max_steps'])")
STAGE1_STEPS=${STAGE1_STEPS:-${PRESET_STEPS% *}}
STAGE2_STEPS=${STAGE2_STEPS:-${PRESET_STEPS#* }}
TIMES=()
timed() {  # timed NAME command...: run it, remember its wall time
  local name=$1; shift
  local start=$SECONDS
  echo "== $name" >&2
  "$@"
  TIMES+=("| $name | $((SECONDS - start)) |")
}

[ -f "$OUT/data/annotations/captions_val2017.json" ] || \
  timed "toy world" $PY -m data.toy_world --out_dir "$OUT/data" --num_train 20000 --num_val 200 --seed 0
[ -f "$OUT/teacher/model_index.json" ] || \
  timed "teacher (text-to-image)" $PY train_teacher.py --data_dir "$OUT/data" --output_dir "$OUT/teacher" \
    --snr_gamma 5 --max_steps "$TEACHER_STEPS" --unet_channels 32,64,64 --vae_steps 400 --clip_steps 500 \
    --resume_from latest  # shorter and smaller than train_teacher.py's default: README, The 30-minute recipe
[ -f "$OUT/lm/config.json" ] || \
  timed "toy LM" $PY -m models.toy_lm --data_dir "$OUT/data" --out_dir "$OUT/lm"
timed "stage 1 (distillation)" $PY train_stage1.py --preset toy --data_dir "$OUT/data" \
  --sd_model_id "$OUT/teacher" --output_dir "$OUT/stage1" --max_steps "$STAGE1_STEPS" --resume_from latest
timed "stage 2 (captioner)" $PY train_stage2.py --preset toy --data_dir "$OUT/data" --llm "$OUT/lm" \
  --stage1_ckpt "$OUT/stage1/vision_encoder_$STAGE1_STEPS.pt" --output_dir "$OUT/stage2" \
  --max_steps "$STAGE2_STEPS" --resume_from latest --finetune_lm --finetune_encoder  # encoder + LM trained: README, Captions
timed "captions + regenerations + metrics" $PY eval_captioning.py \
  --stage1_ckpt "$OUT/stage1/vision_encoder_$STAGE1_STEPS.pt" \
  --stage2_ckpt "$OUT/stage2/captioner_$STAGE2_STEPS.pt" --data_dir "$OUT/data" --split val \
  --metrics bleu,meteor,rouge,cider --out_jsonl "$OUT/eval/preds.jsonl" --regen \
  --num_inference_steps 20 --guidance_scale 2.0 --batch_size 50

echo
echo "| toy stage | wall seconds |"
echo "|---|---|"
printf '%s\n' "${TIMES[@]}"
echo
echo "captions: $OUT/eval/preds.jsonl   scores: $OUT/eval/preds.scores.json"
echo "images with captions and regenerations: $OUT/eval/preds.sheet.png"
echo "stage-1 original | reconstruction grids: $OUT/stage1/reconstructions_*.png"
