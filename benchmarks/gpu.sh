#!/usr/bin/env bash
# Issue 14's GPU check in one go (~8 minutes on an H100/H200): the CUDA tests, the core suite on
# CUDA, then benchmarks/gpu.py (timings, memory model, profile). Logs and gpu.jsonl go to $OUT;
# make the tables with: python -m benchmarks.gpu_report $OUT/gpu.jsonl
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, torchvision, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$OUT/env.txt"
timeout "${CUDA_TESTS_S:-100}" $PY -m pytest -q -p no:cacheprovider -o addopts="" -m "" \
  tests/test_cuda.py tests/test_batched.py 2>&1 | tee "$OUT/tests_cuda.log"
timeout "${BENCH_S:-330}" $PY -m benchmarks.gpu --out "$OUT/gpu.jsonl" --budget "${BUDGET_S:-270}" 2>&1 \
  | grep -v "UserWarning\|warnings.warn\|^  " | tee "$OUT/gpu.log"
timeout "${SUITE_S:-90}" $PY -m pytest -q -p no:cacheprovider -n 8 -m "not slow" ${SUITE:-tests/test_engine.py \
  tests/test_methods.py tests/test_competitors.py tests/test_registry.py tests/test_stats.py} 2>&1 | tail -40 \
  | tee "$OUT/suite.log"
