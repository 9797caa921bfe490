#!/usr/bin/env bash
# Zero-shot (text-only) captioning on the toy world, after scripts/toy_pipeline.sh: the diffusion
# bridge, the visual2text flow and its ridge map, five captioners trained on captions alone (raw
# T(caption), with CapDec noise, centred, centred + noise, centred + the bridge's augmentation),
# then benchmarks.zero_shot's table. CapDec's noise std is chosen from the measured cos(visual, text)
# of the paired train data. Re-running reuses what is on disk and resumes the training stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-checkpoints/toy}
PRECISION=(--mixed_precision "${MIXED_PRECISION:-auto}")
PY=.venv/bin/python
for need in stage1 data; do  # stage2 (the paired limit) is read by the table only
  [ -d "$OUT/$need" ] || { echo "error: $OUT/$need is missing: run scripts/toy_pipeline.sh first (OUT=$OUT)" >&2; exit 2; }
done
source scripts/timed.sh

timed "diffusion bridge" $PY train_diffusion_bridge.py --preset toy --data_dir "$OUT/data" \
  --stage1_ckpt "$OUT/stage1" --output_dir "$OUT/bridge" --resume_from latest "${PRECISION[@]}"
timed "flow: visual2text" $PY train_flowmatching.py --preset toy --mode visual2text --data_dir "$OUT/data" \
  --stage1_ckpt "$OUT/stage1" --output_dir "$OUT/flow_v2t" --resume_from latest "${PRECISION[@]}"
RAW_STD=$($PY -m benchmarks.zero_shot --run "$OUT" --noise_std raw)
CENTRE_STD=$($PY -m benchmarks.zero_shot --run "$OUT" --noise_std center)
text_only() {  # text_only NAME flags...: a captioner trained on captions alone
  local name=$1; shift
  timed "text-only captioner: $name" $PY train_stage2.py --preset toy --text_only --data_dir "$OUT/data" \
    --llm "$OUT/lm" --stage1_ckpt "$OUT/stage1" --output_dir "$OUT/zero_shot/$name" --resume_from latest \
    "${PRECISION[@]}" "$@"
}
text_only text_raw --text_norm none
text_only text_raw_noise --text_norm none --text_noise_std "$RAW_STD"
text_only text_centre --bridge_ckpt "$OUT/bridge"
text_only text_centre_noise --bridge_ckpt "$OUT/bridge" --text_noise_std "$CENTRE_STD"
text_only text_bridge --bridge_ckpt "$OUT/bridge" --bridge_aug_t0 400
mkdir -p "$OUT/eval"
timed "zero-shot table (benchmarks.zero_shot)" $PY -m benchmarks.zero_shot --run "$OUT" > "$OUT/eval/zero_shot.md"
$PY train_diffusion_bridge.py --visualize --ckpt "$OUT/bridge" --data_dir "$OUT/data" --out "$OUT/eval/bridge_effect.png"

echo
cat "$OUT/eval/zero_shot.md"
echo
echo "CapDec noise std: raw $RAW_STD, centred $CENTRE_STD"
$PY -c "import common; print(common.machine_description())"
echo "| zero-shot stage | wall seconds |"
echo "|---|---|"
printf '%s\n' "${TIMES[@]}"
