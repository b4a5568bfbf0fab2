#!/bin/bash
# Regenerate leaderboard/ from the runs of sweeps/corruptions.toml (the image corruption benchmark)
# and sweeps/embedded.toml (text, multiple choice), offline on CPU, logged to one store.
# Resumable: finished jobs are skipped, interrupted ones resume (see sweeps/README.md).
# Cost on this kind of 2-core machine with WORKERS=2: about 5.4 h for the 630 image jobs (measured,
# see leaderboard/README.md), about 1.5 h more for text and MC.
#   bash leaderboard/regenerate.sh
#   WORKERS=2 bash leaderboard/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-sqlite:///$PWD/leaderboard-runs/mlflow.db}
mkdir -p leaderboard-runs
export TTA_BENCH_OFFLINE=1
for spec in sweeps/corruptions.toml sweeps/embedded.toml; do
  tta-bench sweep "$spec" --workers "${WORKERS:-1}" --state leaderboard-runs/state \
    --tracking-uri "$STORE" || echo "some jobs of $spec did not finish (listed above); building from the others"
done
tta-bench leaderboard --tracking-uri "$STORE" --out leaderboard
