#!/bin/bash
# Regenerate leaderboard/ from the runs of sweeps/corruptions.toml (the image corruption benchmark)
# and sweeps/embedded.toml (text, multiple choice, the threshold figure), offline on CPU, logged to
# one store, merged with the published runs tables (leaderboard/*/runs.csv): a run in the store
# replaces the published one of the same configuration, method, lr and threshold.
# Resumable: finished jobs are skipped, interrupted ones resume (see sweeps/README.md).
# Cost on this kind of 2-core machine with WORKERS=2: about 5.4 h for the 630 image jobs, about
# 1.6 h for text and MC (measured, see leaderboard/README.md). SPECS picks the sweeps:
#   WORKERS=2 bash leaderboard/regenerate.sh
#   WORKERS=2 SPECS=sweeps/embedded.toml bash leaderboard/regenerate.sh   # text, MC; image runs as published
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-sqlite:///$PWD/leaderboard-runs/mlflow.db}
mkdir -p leaderboard-runs
export TTA_BENCH_OFFLINE=1
for spec in ${SPECS:-sweeps/corruptions.toml sweeps/embedded.toml}; do
  tta-bench sweep "$spec" --workers "${WORKERS:-1}" --state leaderboard-runs/state \
    --tracking-uri "$STORE" || echo "some jobs of $spec did not finish (listed above); building from the others"
done
shopt -s nullglob
published=(leaderboard/*/runs.csv)
tta-bench leaderboard --tracking-uri "$STORE" ${published[@]:+--runs "${published[@]}"} --out leaderboard
