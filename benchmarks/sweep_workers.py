"""Wall time of one sweep with 1 vs N local workers (not a test).

    python -m benchmarks.sweep_workers --workers 2 --limit 300

Runs the same small real sweep (CIFAR-10 on EfficientNet-Lite0: clean and contrast × ifo and
entropy, the paper's 19 learning rates) into fresh state folders and SQLite stores with 1 worker ×
1 thread, N workers × 1 thread and 1 worker × N threads, and checks that the first two give the
same metrics (different thread counts may round differently)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

SPEC = """
name = "bench"
lr_grid = "paper"
limit = {limit}
[[tasks]]
name = "cifar10"
corruption = ["none", "contrast"]
[[methods]]
name = "ifo"
[[methods]]
name = "entropy"
"""
METRICS = ["delta_acc", "n_fixed", "n_broken", "n_uncertain"]


def sweep(root: Path, spec: Path, workers: int, threads: int) -> tuple[float, dict]:
    folder = root / f"w{workers}t{threads}"
    uri = f"sqlite:///{folder}/mlflow.db"
    folder.mkdir()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tta_bench.cli", "sweep", str(spec), "--workers", str(workers),
                    "--threads-per-worker", str(threads), "--state", str(folder / "state"),
                    "--tracking-uri", uri], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["bench"], filter_string="tags.`tta_bench.kind` = 'result'")
    key = runs["tags.tta_bench.configuration"] + "|" + runs["tags.tta_bench.method"] + "|" + runs["params.lr"]
    return wall, dict(zip(key, runs[[f"metrics.{m}" for m in METRICS]].values.tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = root / "bench.toml"
        spec.write_text(SPEC.format(limit=args.limit))
        one, one_metrics = sweep(root, spec, 1, 1)
        many, many_metrics = sweep(root, spec, args.workers, 1)
        threaded, _ = sweep(root, spec, 1, args.workers)
    print(f"4 jobs × {args.limit} images × 19 lrs (wall time of the sweep command, model loading included):")
    print(f"  1 worker × 1 thread {one:.1f} s; {args.workers} workers × 1 thread {many:.1f} s "
          f"(speed-up {one / many:.2f}x); 1 worker × {args.workers} threads {threaded:.1f} s")
    print(f"  metrics of 1 vs {args.workers} workers identical: {one_metrics == many_metrics} "
          f"({len(one_metrics)} result runs)")


if __name__ == "__main__":
    main()
