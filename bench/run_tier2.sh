#!/usr/bin/env bash
# Issue 10 on the lent GPU: the tier-2 speedrun (stage 1 on a stream of rendered pages, then
# evaluation on held-out pages). Run in the repo root on the device with .gpu and .fonts carried:
#   bash bench/run_tier2.sh [jobs/speedrun.py flags...]
# Writes speedrun.log, the evaluation folders and the MLflow file store under $OUT.
set -uo pipefail
source .gpu/env.sh
export NDOCR_FONT_DIR=${NDOCR_FONT_DIR:-$PWD/.fonts}
OUT=${OUT:-/tmp/tier2-out}
mkdir -p "$OUT"
export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-file://$OUT/mlruns}
python -c "from pipeline.synth import font_dir; d = font_dir(); assert d, 'no fonts: set NDOCR_FONT_DIR'; print('fonts', d)" || exit 2
python jobs/speedrun.py --config jobs/configs/speedrun_tier2.yaml --no-serve "$@" > "$OUT/speedrun.log" 2>&1
status=$?
grep -E "stage1 step|^==>|^\||finished in|^  [a-z]|Error" "$OUT/speedrun.log" | grep -v " INFO \|WARNING" | awk '!seen[$0]++' | tail -150
exit $status
