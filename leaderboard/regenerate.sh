#!/bin/bash
# Regenerate leaderboard/ under the published rule, held-out selection (issue 26):
#  - the image part from sweeps/fair.toml (every method on the 19-lr grid with its knobs, on the
#    validation configurations and the test configurations), and text and MC from
#    sweeps/fair-lm.toml (ifo and input-ft on the LLM lr grid, on held-out documents / questions
#    and on the scored test halves; on text also the base model and the retrieval methods at the
#    SIFT paper's setting, not tuned, on the test windows), run in-process by
#    benchmarks/fair_gpu.py into run folders
#    under leaderboard-runs/fair (resumable: a run folder with run.json is done, one with only a
#    checkpoint.parquet resumes where it stopped; seeded from the
#    committed runs of benchmarks/results/fair-*-runs.tgz; runs of a method whose definition has
#    changed since, e.g. PASLE's own gate before issue 27, are set aside and rerun: see
#    fair_gpu.set_aside_superseded); on a GPU machine without registries
#    use benchmarks/fair_gpu.sh instead and unpack its runs.tgz into leaderboard-runs/fair;
#  - the four threshold runs of the image task's threshold figure, kept from the committed table;
#  - a new method variant only once it has run on every configuration its task's published table
#    scores (e.g. a retrieval method on every text corpus);
#  - only runs that are jobs of the two specs (a configuration they no longer have is superseded).
# Cost: ~100 s per image job on one CPU core (1738 jobs), ~21 min for 1185 of them on one H200 with
# 14 workers (measured on 644); text and MC without retrieval ~1.5 h on one core, the four
# retrieval methods at N = 50 ~9.5 h more (GPU).
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
left = complete_view(Path('$FAIR'), Path('leaderboard-runs/scored'), sorted(Path('leaderboard').glob('*/runs.csv')),
                     [Path('sweeps/fair.toml'), Path('sweeps/fair-lm.toml')])
print('runs left out of this build (new variants not yet on every scored configuration; superseded):',
      '; '.join(left) or 'none')"
tta-bench leaderboard --select heldout --out leaderboard --runs leaderboard-runs/scored leaderboard-runs/cifar10-thresholds.csv
