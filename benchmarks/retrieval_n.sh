#!/usr/bin/env bash
# Issue 29's N curve on CPU: nn and sift at N = 8 and N = 50 on the same windows of one corpus, one
# lane per method sharing the cores. Each run is resumable: at the deadline it is stopped (SIGTERM
# keeps the finished windows in its run folder and checkpoint) and the same command continues it.
# A lane gives N = 8 a seventh of its time (a window there costs about a sixth of one at N = 50),
# so both reach about the same windows; the report compares the windows every run finished.
#   DEADLINE_S=3600 bash benchmarks/retrieval_n.sh
#   python -m benchmarks.retrieval_report --folders leaderboard-runs/retrieval-n/licenses-* --paired "nn N=50" "sift N=50"
set -uo pipefail
cd "$(dirname "$0")/.."
OUTS=${OUTS:-leaderboard-runs/retrieval-n}; CORPUS=${CORPUS:-licenses}; WINDOWS=${WINDOWS:-200}
export TTA_BENCH_OFFLINE=1 OMP_NUM_THREADS=1
start=$(date +%s); budget=${DEADLINE_S:-3600}
run() {  # method N seconds [max windows [folder]]: run (or resume) for at most that long
  local out="$OUTS/${5:-$CORPUS-$1-n$2}"
  [ -f "$out/run.json" ] && [ ! -f "$out/checkpoint.parquet" ] && return 0  # finished
  [ "$3" -gt 60 ] || return 0
  local resume=(); [ -f "$out/checkpoint.parquet" ] && resume=(--resume)
  timeout -s TERM "$3" tta-bench run --task text --corpus "$CORPUS" --data-space split --seq-len 64 \
    --data-space-size 10000 --method "$1" -H "n_select=$2" --gate none --max-uncertain "${4:-$WINDOWS}" \
    --threads 1 --no-progress --no-tracking --out "$out" "${resume[@]}" >>"$out.log" 2>&1
}
mkdir -p "$OUTS"
# the data space is built (and cached) once, by a one-window run, before the lanes read it
run nn 8 "$budget" 1 "warmup-$CORPUS"
left=$(( budget - ($(date +%s) - start) ))
lane() { run "$1" 8 $(( left / 7 )); run "$1" 50 $(( left - left / 7 )); }
lane nn & lane sift &
wait
