#!/bin/bash
# Regenerate leaderboard/ from the runs of sweeps/embedded.toml (offline, CPU), logged to one store.
# Resumable: finished jobs are skipped, interrupted ones resume (see sweeps/README.md).
# Cost on this kind of 2-core machine: about 50 min for the image jobs, hours for text and MC.
#   bash leaderboard/regenerate.sh
#   WORKERS=2 bash leaderboard/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STORE=${STORE:-sqlite:///$PWD/leaderboard-runs/mlflow.db}
mkdir -p leaderboard-runs
export TTA_BENCH_OFFLINE=1
tta-bench sweep sweeps/embedded.toml --workers "${WORKERS:-1}" --state leaderboard-runs/state \
  --tracking-uri "$STORE" || echo "some jobs did not finish (listed above); building from the others"
tta-bench leaderboard --tracking-uri "$STORE" --out leaderboard
