#!/bin/bash
# Regenerate leaderboard/ from runs on the embedded real tasks, logged to one MLflow store.
# Resumable: a run whose folder already holds run.json is not run again (its results are synced).
# Cost on one CPU thread: about 50 min for the image runs, several hours for text and MC.
#   bash leaderboard/regenerate.sh            # image + text + MC
#   PARTS=image bash leaderboard/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-leaderboard-runs}
STORE=${STORE:-sqlite:///$PWD/$RUNS/mlflow.db}
PARTS=${PARTS:-image text mc}
THREADS=${THREADS:-1}
mkdir -p "$RUNS"
export TTA_BENCH_OFFLINE=1

run() {  # run NAME ARGS...: one configuration × method, skipped when already done
  local name=$1; shift
  [ -f "$RUNS/$name/run.json" ] || tta-bench run "$@" --threads "$THREADS" --no-progress \
    --tracking-uri "$STORE" --out "$RUNS/$name"
}

if [[ $PARTS == *image* ]]; then  # CIFAR-10 (clean + 4 CIFAR-10-C corruptions), 1,000 balanced images
  for c in none gaussian_noise gaussian_blur contrast jpeg; do
    for m in ifo entropy tent dofo sar pasle; do
      run "cifar10-$c-$m" --task cifar10 --corruption $c --method $m --limit 1000 --lr-grid paper
    done
  done
  for d in 0.04 0.08 0.32 0.64; do  # the threshold figure
    run "cifar10-none-ifo-d$d" --task cifar10 --method ifo --threshold $d --limit 1000 --lr-grid paper
  done
fi
if [[ $PARTS == *text* ]]; then  # SmolLM2-135M-Instruct, 500 uncertain 128-token windows per corpus
  for c in shakespeare python-stdlib licenses; do
    for m in ifo input-ft; do
      run "text-$c-$m" --task text --corpus $c --method $m --max-uncertain 500 --lr-grid llm
    done
  done
fi
if [[ $PARTS == *mc* ]]; then  # every question of the four embedded multiple-choice sets
  for d in general-knowledge physical-intuition mmlu-dev truthfulqa-mc; do
    for m in ifo input-ft; do
      run "mc-$d-$m" --task mc --dataset $d --method $m --lr-grid llm
    done
  done
fi
tta-bench sync "$RUNS" --tracking-uri "$STORE" > /dev/null  # anything run before tracking existed
tta-bench leaderboard --tracking-uri "$STORE" --out leaderboard
