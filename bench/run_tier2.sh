#!/usr/bin/env bash
# Issue 10 on the lent GPU: a tier-2 speedrun (stage 1 on a stream of rendered pages, then
# evaluation on held-out pages). Run in the repo root on the device with .gpu and .fonts carried:
#   bash bench/run_tier2.sh [jobs/speedrun.py flags...]      # e.g. --stage1-steps 2000
#   CONFIG=jobs/configs/speedrun_tier2_glyphs.yaml bash bench/run_tier2.sh ...
# Writes speedrun.log, eval_summary.json (+ eval.tgz, its predictions) and the MLflow file store
# (mlruns.tgz: extract it for bench/tier2_summary.py) under $OUT. A stage stopped
# at its time limit resumes when the same command runs again on the still-warm machine; the MLflow
# store is kept under artifacts/ between calls ($OUT starts empty each call), so the resumed stage
# logs into the same run; an evaluation cut off by CALL_LIMIT_S goes on from the splits it finished.
set -uo pipefail
source .gpu/env.sh
export NDOCR_FONT_DIR=${NDOCR_FONT_DIR:-$PWD/.fonts}
# .gpu and .fonts together can pass the 64 MiB a device call carries: the fonts may travel packed
# instead (tar cJf .gpu/fonts.tar.xz -C .fonts .; carry .gpu alone)
if [ ! -d "$NDOCR_FONT_DIR" ] && [ -f .gpu/fonts.tar.xz ]; then
  mkdir -p "$NDOCR_FONT_DIR" && tar xJf .gpu/fonts.tar.xz -C "$NDOCR_FONT_DIR"
fi
OUT=${OUT:-/tmp/tier2-out}
CONFIG=${CONFIG:-jobs/configs/speedrun_tier2.yaml}
KEEP=artifacts/tier2_mlruns
mkdir -p "$OUT" artifacts
if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then  # the bundle's MLflow has no SQLAlchemy: a file store
  rm -rf "$OUT/mlruns"
  [ -d "$KEEP" ] && cp -r "$KEEP" "$OUT/mlruns"
  export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file://$OUT/mlruns
  # kept for a resumed call; sent back as one archive (the store's folders are nested deeper than
  # the device returns)
  trap 'rm -rf "$KEEP"; if [ -d "$OUT/mlruns" ]; then cp -r "$OUT/mlruns" "$KEEP";
        tar czf "$OUT/mlruns.tgz" -C "$OUT" mlruns && rm -rf "$OUT/mlruns"; fi' EXIT
fi
python -c "from pipeline.synth import font_dir, missing_font_files as m; d = font_dir(); assert d and not m(d), \
  f'fonts missing from {d}: {m(d)} (NDOCR_FONT_DIR)'; print('fonts', d)" || exit 2
touch "$OUT/.started"
# the device ends a call at 600 s with no time for the archive below (session 17 lost a resumed
# stage's MLflow record so): stop the job first; a stopped stage or evaluation resumes next call
# stage 1 also checkpoints STOP_MARGIN_S before that, however long the steps before it took (session 23
# lost a first call's 1,075 steps: Ray, data and compiling took over 140 s, so --stage1-time-limit 430,
# counted from the training loop's start, was never reached)
CALL_LIMIT_S=${CALL_LIMIT_S:-570}
STOP_MARGIN_S=${STOP_MARGIN_S:-45}
timeout -k 15 "$CALL_LIMIT_S" python jobs/speedrun.py --config "$CONFIG" --no-serve \
  --stage1-stop-within $((CALL_LIMIT_S - STOP_MARGIN_S)) "$@" > "$OUT/speedrun.log" 2>&1
status=$?
[ $status -eq 124 ] && echo "==> stopped at CALL_LIMIT_S=$CALL_LIMIT_S s: run the same command again to go on"

# this call's evaluation summary (if it got that far) travels back beside the log (tier2_summary.py
# --eval-summary); the YAML's `out:` (a --out flag elsewhere is not followed)
root=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1])).get('out', 'artifacts'))" "$CONFIG")
if [ -n "$(find "$root/eval/summary.json" -newer "$OUT/.started" 2>/dev/null)" ]; then
  cp "$root/eval/summary.json" "$OUT/eval_summary.json"
  tar czf "$OUT/eval.tgz" -C "$root" eval  # the predictions behind it (examples for RESULTS.md)
fi
rm -f "$OUT/.started"
grep -E "stage1 step|startup:|^==>|^\||finished in|^  [a-z]|Error" "$OUT/speedrun.log" | grep -v " INFO \|WARNING" | awk '!seen[$0]++' | tail -150
exit $status
