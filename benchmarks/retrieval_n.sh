#!/usr/bin/env bash
# Issue 29's N curve on CPU: nn and sift at each N of NS on the same windows of one corpus. Each run
# is resumable: at the deadline it is stopped (SIGTERM keeps the finished windows in its run folder
# and checkpoint) and the same command continues it. The runs of a lane share its time by what a
# window costs at their N (~14 s + 0.84 s a step on one core), so they reach about the same windows;
# the report compares the windows every run finished.
#   DEADLINE_S=3600 bash benchmarks/retrieval_n.sh                       # N = 8, 50: a lane per method
#   NS="16 32" LANES=one WINDOWS=62 DEADLINE_S=3600 bash benchmarks/retrieval_n.sh  # one core, in turn
#   python -m benchmarks.retrieval_report --folders leaderboard-runs/retrieval-n/licenses-* --paired "nn N=50" "sift N=50"
set -uo pipefail
cd "$(dirname "$0")/.."
OUTS=${OUTS:-leaderboard-runs/retrieval-n}; CORPUS=${CORPUS:-licenses}; WINDOWS=${WINDOWS:-200}
NS=${NS:-8 50}; METHODS=${METHODS:-nn sift}
LANES=${LANES:-method}  # method: one lane per method, sharing the cores; one: every run in turn, one core
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
cost() { echo $(( 1400 + 84 * $1 )); }  # a window's seconds at N on one core, ×100
lane() {  # "method N" pairs in turn; each gets its cost's share of the time the lane has left
  local total=0 p
  for p in "$@"; do total=$(( total + $(cost "${p#* }") )); done
  for p in "$@"; do
    local c; c=$(cost "${p#* }")
    run "${p% *}" "${p#* }" $(( (budget - ($(date +%s) - start)) * c / total ))
    total=$(( total - c ))
  done
}
mkdir -p "$OUTS"
# the data space is built (and cached) once, by a one-window run, before the lanes read it
run nn 8 "$budget" 1 "warmup-$CORPUS"
if [ "$LANES" = one ]; then
  pairs=(); for n in $NS; do for m in $METHODS; do pairs+=("$m $n"); done; done
  lane "${pairs[@]}"
else
  for m in $METHODS; do pairs=(); for n in $NS; do pairs+=("$m $n"); done; lane "${pairs[@]}" & done
  wait
fi
