#!/bin/bash
# Regenerate leaderboard/ under the published rule, held-out selection (issue 26):
#  - the image part from sweeps/fair.toml (every method on the 19-lr grid with its knobs, on the
#    validation configurations and the test configurations), and text and MC from
#    sweeps/fair-lm.toml (ifo and input-ft on the LLM lr grid, on held-out documents / questions
#    and on the scored test halves), run in-process by benchmarks/fair_gpu.py into run folders
#    under leaderboard-runs/fair (resumable: a run folder with run.json is done; seeded from the
#    committed runs of benchmarks/results/fair-*-runs.tgz; runs of a method whose definition has
#    changed since, e.g. PASLE's own gate before issue 27, are set aside and rerun: see
#    fair_gpu.set_aside_superseded); on a GPU machine without registries
#    use benchmarks/fair_gpu.sh instead and unpack its runs.tgz into leaderboard-runs/fair;
#  - the four threshold runs of the image task's threshold figure, kept from the committed table;
#  - a new method variant only once it has run on every configuration the published table scores.
# Cost: ~100 s per image job on one CPU core (1738 jobs), ~21 min for 1185 of them on one H200 with
# 14 workers (measured on 644); text and MC (28 jobs) ~1.6 h on 2 cores.
#   WORKERS=2 bash leaderboard/regenerate.sh
#   WORKERS=2 SPECS=sweeps/fair-lm.toml bash leaderboard/regenerate.sh   # text and MC only
#   SPECS= bash leaderboard/regenerate.sh                                # rebuild the tables only
set -euo pipefail
cd "$(dirname "$0")/.."
FAIR=leaderboard-runs/fair
mkdir -p "$FAIR"
export TTA_BENCH_OFFLINE=1
python -c "from pathlib import Path
from benchmarks.fair_gpu import unpack_committed; unpack_committed(Path('$FAIR'))"
for spec in ${SPECS-sweeps/fair.toml sweeps/fair-lm.toml}; do
  python -m benchmarks.fair_gpu "$spec" --runs "$FAIR" --workers "${WORKERS:-1}" --device cpu \
    || echo "some jobs of $spec did not finish; building from the others"
done
# the threshold runs (d != 0.16) of the committed image table; its d = 0.16 rows are the new runs'
python - <<'EOF'
import pandas as pd
runs = pd.read_csv("leaderboard/cifar10/runs.csv", dtype=str)
runs[pd.to_numeric(runs["threshold"]) != 0.16].to_csv("leaderboard-runs/cifar10-thresholds.csv", index=False)
EOF
# a new method variant is scored once it has a run on every configuration the published table scores
# (one with fewer would take those configurations out of every method's score); say who waits
python -c "from pathlib import Path
from benchmarks.fair_gpu import complete_view
left = complete_view(Path('$FAIR'), Path('leaderboard-runs/scored'), Path('leaderboard/cifar10/runs.csv'))
print('test runs left out of this build (not yet on every scored configuration):', '; '.join(left) or 'none')"
tta-bench leaderboard --select heldout --out leaderboard --runs leaderboard-runs/scored leaderboard-runs/cifar10-thresholds.csv
