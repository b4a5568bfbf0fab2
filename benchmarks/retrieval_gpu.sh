#!/usr/bin/env bash
# Issue 13's report runs (sweeps/retrieval.toml's methods, with N = 8) on one GPU, as
# `tta-bench run --no-tracking` processes (for a GPU machine without MLflow), one lane per corpus
# running side by side (one process keeps a GPU only partly busy on a 135M model), every lane under
# one deadline (a run it stops keeps the windows it finished). Their run folders are packed into
# $OUT/runs.tgz; log them where MLflow is installed and make the report:
#   tar xzf runs.tgz && tta-bench sync runs --tracking-uri URI --experiment tta-bench-retrieval-gpu
#   python -m benchmarks.retrieval_report --experiment tta-bench-retrieval-gpu --tracking-uri URI
# On a GPU machine without package registries, carry the packages first: benchmarks/device_carry.sh.
# Settings (environment): N (sequences per window, 8), WINDOWS (200), SEQ_LEN (64),
# SPACE_SIZE (10000), EMBEDDER (all-minilm-l6-v2), DEADLINE_S (420), CORPORA, METHODS, LANES
# (corpus: one lane per corpus, its methods in turn; job: every corpus x method at once, 1 thread each;
# a number K: K lanes sharing the corpus x method jobs in turn, e.g. on a 2-core CPU machine
# LANES=2 THREADS=1 DEADLINE_S=9000: one corpus's 7 methods at N = 8 take ~1.9 h there),
# RESUME (a runs.tgz of an earlier call: its finished runs are kept, its runs stopped at the deadline
# continue from their checkpoints with --resume).
set -uo pipefail
OUT=${OUT:-retrieval-gpu}
N=${N:-8}; WINDOWS=${WINDOWS:-200}; DEADLINE_S=${DEADLINE_S:-420}
CORPORA=${CORPORA:-"shakespeare python-stdlib licenses"}
METHODS=${METHODS:-"none nn sift ifo input-ft nn-f random"}  # most wanted first
LANES=${LANES:-corpus}; [[ $LANES == corpus ]] || THREADS=${THREADS:-1}
TASK=(--task text --data-space split --seq-len "${SEQ_LEN:-64}" --data-space-size "${SPACE_SIZE:-10000}"
      --embedding-model "${EMBEDDER:-all-minilm-l6-v2}" --gate none --max-uncertain "$WINDOWS" --no-tracking --no-progress --threads "${THREADS:-4}")
export TTA_BENCH_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT/runs"
[[ -n ${RESUME:-} ]] && tar xzf "$RESUME" -C "$OUT"
start=$(date +%s)

job() {  # job CORPUS METHOD [timeout s]: one run (or the rest of a stopped one), its log beside the others
  local extra=() folder="$OUT/runs/$1-$2"
  case $2 in nn|nn-f|sift|random) extra=(-H "n_select=$N") ;; ifo|input-ft) extra=(--lr-grid llm) ;; esac
  if [[ -f $folder/checkpoint.parquet ]]; then extra+=(--resume)
  elif [[ -f $folder/run.json ]]; then echo "$1 $2: finished earlier"; return; fi
  timeout -s TERM "${3:-600}" tta-bench run "${TASK[@]}" --corpus "$1" --method "$2" "${extra[@]}" \
    --out "$folder" >>"$folder.log" 2>&1
  local rc=$?
  echo "$(date -u +%T) $1 $2 exit $rc ($(( $(date +%s) - start )) s)"
}

lane() {  # lane CORPORA [K W]: its jobs in order (every K-th from the W-th), until the deadline
  local i=0
  for corpus in $1; do for method in $METHODS; do
    (( i++ % ${2:-1} == ${3:-0} )) || continue
    local left=$(( start + DEADLINE_S - $(date +%s) ))
    (( left > 15 )) || { echo "deadline: $corpus $method not run"; continue; }
    job "$corpus" "$method" "$left"
  done; done
}

# The model and embedder caches are filled once, by one process, then each corpus's data space by
# one process per corpus, before the lanes share them.
warm_up() {
  timeout 300 tta-bench run "${TASK[@]}" --corpus "$1" --method nn -H n_select=1 --limit 1 \
    --out "/tmp/retrieval-warm-up-$1" --overwrite >"$OUT/warm-up-$1.log" 2>&1
  echo "caches filled for $1: exit $? ($(( $(date +%s) - start )) s)"
}
first=${CORPORA%% *}
warm_up "$first"
for corpus in $CORPORA; do [[ $corpus == "$first" ]] || warm_up "$corpus" & done
wait
if [[ $LANES == job ]]; then
  for corpus in $CORPORA; do for method in $METHODS; do
    job "$corpus" "$method" $(( start + DEADLINE_S - $(date +%s) )) &
  done; done
elif [[ $LANES =~ ^[0-9]+$ ]]; then
  for w in $(seq 0 $((LANES - 1))); do lane "$CORPORA" "$LANES" "$w" & done
else
  for corpus in $CORPORA; do lane "$corpus" & done
fi
wait
tar czf "$OUT/runs.tgz" -C "$OUT" runs && rm -rf "$OUT/runs"
echo "done in $(( $(date +%s) - start )) s"
