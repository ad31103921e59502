#!/usr/bin/env bash
# Issue 10 on the lent GPU: a tier-2 speedrun (stage 1 on a stream of rendered pages, then
# evaluation on held-out pages). Run in the repo root on the device with .gpu and .fonts carried:
#   bash bench/run_tier2.sh [jobs/speedrun.py flags...]      # e.g. --stage1-steps 2000
#   CONFIG=jobs/configs/speedrun_tier2_glyphs.yaml bash bench/run_tier2.sh ...
# Writes speedrun.log, eval_summary.json (+ eval.tgz, its predictions) and the MLflow file store
# (mlruns.tgz: extract it for bench/tier2_summary.py; a profile's trace comes beside it as
# profile_trace.json.gz, for Perfetto) under $OUT.
#
# Two ways to outlast one device call (the device ends a command at 600 s):
# - resumed (default): a stage stopped at its time limit resumes when the same command runs again
#   on the still-warm machine; the MLflow store is kept under artifacts/ between calls ($OUT starts
#   empty each call), so the resumed stage logs into the same run; an evaluation cut off by
#   CALL_LIMIT_S goes on from the splits it finished. Each call starts Ray, the workers and the
#   compiled graphs again: ~120 s of a ~540 s call in session 24.
# - DETACH=1: the speedrun runs in its own process session (setsid), which the device leaves running
#   between calls until the machine goes back (30 s idle). Each call starts it if it is not running,
#   follows it for up to CALL_LIMIT_S and sends back a snapshot (log, MLflow store, and the evaluation
#   once it is done). Call again at once, with the same command, until it prints "==> the run ended".
#   Nothing restarts between calls; if the machine goes back meanwhile, the run is lost with it.
#   END_WITHIN_S (seconds from the run's start, default 1300) ends stage 1 as finished at the step it
#   reached (--stage1-end-within) if it has not finished by then, so that the evaluation still runs
#   before the session's device time does: set it to that time less the evaluation's (~160 s) and a margin.
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
DETACH=${DETACH:-0}
KEEP=artifacts/tier2_mlruns
# a detached run: pid, rc (once it ended), started, speedrun.log and its MLflow store (MLflow's file
# store cannot live under a folder named `artifacts`); ignored by git, so the device keeps it between calls
JOB=.tier2_job
# the device ends a call at 600 s with no time for the archive below (session 17 lost a resumed
# stage's MLflow record so): stop the job (or stop following it) first
CALL_LIMIT_S=${CALL_LIMIT_S:-570}
mkdir -p "$OUT" artifacts
# the MLflow store under $1 as one archive (its folders nest deeper than the device returns), with the
# newest profile trace (--stage1-set profile_at=N) beside it: one large trace must not keep the whole
# store from coming back (16 MiB a file)
send_store() {
  local trace
  trace=$(find "$1/mlruns" -name trace.json.gz -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
  [ -n "$trace" ] && cp "$trace" "$OUT/profile_trace.json.gz"
  tar czf "$OUT/mlruns.tgz" --exclude=trace.json.gz -C "$1" mlruns
}
if [ -z "${MLFLOW_TRACKING_URI:-}" ]; then  # the bundle's MLflow has no SQLAlchemy: a file store
  if [ "$DETACH" = 1 ]; then  # the running job writes the kept store itself; each call sends a snapshot
    export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file://$PWD/$JOB/mlruns
    trap 'if [ -d "$JOB/mlruns" ]; then send_store "$JOB"; fi' EXIT
  else
    rm -rf "$OUT/mlruns"
    [ -d "$KEEP" ] && cp -r "$KEEP" "$OUT/mlruns"
    export MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=file://$OUT/mlruns
    # kept for a resumed call
    trap 'rm -rf "$KEEP"; if [ -d "$OUT/mlruns" ]; then cp -r "$OUT/mlruns" "$KEEP";
          send_store "$OUT" && rm -rf "$OUT/mlruns"; fi' EXIT
  fi
fi
python -c "from pipeline.synth import font_dir, missing_font_files as m; d = font_dir(); assert d and not m(d), \
  f'fonts missing from {d}: {m(d)} (NDOCR_FONT_DIR)'; print('fonts', d)" || exit 2

if [ "$DETACH" = 1 ]; then
  if [ -f "$JOB/pid" ] && kill -0 "$(cat "$JOB/pid")" 2>/dev/null; then
    echo "==> following the detached run (pid $(cat "$JOB/pid"), started $(date -d @"$(cat "$JOB/started")" +%T))"
  elif [ -f "$JOB/rc" ]; then
    echo "==> the detached run had ended before this call"
  else
    rm -rf "$JOB" && mkdir -p "$JOB" && date +%s > "$JOB/started"
    END_WITHIN_S=${END_WITHIN_S:-1300}
    # its own session: the device kills what a call leaves running, except that
    setsid bash -c 'echo $$ > "$0/pid"; python jobs/speedrun.py --config "$1" --no-serve --stage1-end-within "$2" \
      "${@:3}" > "$0/speedrun.log" 2>&1; echo $? > "$0/rc"' "$JOB" "$CONFIG" "$END_WITHIN_S" "$@" \
      < /dev/null > /dev/null 2>&1 &
    for _ in $(seq 50); do [ -s "$JOB/pid" ] && break; sleep 0.1; done
    echo "==> started the detached run (pid $(cat "$JOB/pid")); stage 1 ends by ${END_WITHIN_S} s from now"
  fi
  t0=$(date +%s)
  while [ ! -f "$JOB/rc" ] && [ $(($(date +%s) - t0)) -lt "$CALL_LIMIT_S" ]; do sleep 5; done
  cp "$JOB/speedrun.log" "$OUT/speedrun.log"
  started_mark=$JOB/started
  if [ -f "$JOB/rc" ]; then
    status=$(cat "$JOB/rc")
    echo "==> the run ended (rc $status) after $(($(date +%s) - $(cat "$JOB/started"))) s"
  else
    status=3
    echo "==> still running after $(($(date +%s) - $(cat "$JOB/started"))) s: call again now (same command) to follow it"
  fi
else
  touch "$OUT/.started"
  started_mark=$OUT/.started
  # stage 1 also checkpoints STOP_MARGIN_S before the call's limit, however long the steps before it took
  # (session 23 lost a first call's 1,075 steps: Ray, data and compiling took over 140 s, so
  # --stage1-time-limit 430, counted from the training loop's start, was never reached)
  STOP_MARGIN_S=${STOP_MARGIN_S:-45}
  timeout -k 15 "$CALL_LIMIT_S" python jobs/speedrun.py --config "$CONFIG" --no-serve \
    --stage1-stop-within $((CALL_LIMIT_S - STOP_MARGIN_S)) "$@" > "$OUT/speedrun.log" 2>&1
  status=$?
  [ $status -eq 124 ] && echo "==> stopped at CALL_LIMIT_S=$CALL_LIMIT_S s: run the same command again to go on"
fi

# the evaluation summary (if the run got that far since it started) travels back beside the log
# (tier2_summary.py --eval-summary); the YAML's `out:` (a --out flag elsewhere is not followed)
root=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1])).get('out', 'artifacts'))" "$CONFIG")
if [ -n "$(find "$root/eval/summary.json" -newer "$started_mark" 2>/dev/null)" ]; then
  cp "$root/eval/summary.json" "$OUT/eval_summary.json"
  tar czf "$OUT/eval.tgz" -C "$root" eval  # the predictions behind it (examples for RESULTS.md)
fi
rm -f "$OUT/.started"
grep -E "stage1 step|startup:|end time|^==>|^\||finished in|^  [a-z]|Error|profile of steps|ms/step|\) steps |host phases|device busy|device spans|top ops" \
  "$OUT/speedrun.log" | grep -v " INFO \|WARNING" | awk '!seen[$0]++' | tail -150
exit $status
