"""The cifar10 task's model zoo (EfficientNet-Lite0/1/2, real ImageNet-1k weights), each at its own
resolution: clean source accuracy, the fraction of uncertain samples (Δ1,2 = p(1) − p(2) < d over
the 10 CIFAR classes, as the gate computes it) and source samples/s at batch 1 and batch 64.

Accuracy: batched no-grad forwards (--batch, default 8) over the first --images samples of the task's balanced order
(10,000 = the whole test set; any multiple of 10 is class-balanced). Speed: collate + forward +
class logits + softmax, timed after a warm-up, on --threads CPU threads (default 1).

    python -m benchmarks.zoo_accuracy_speed                  # all models, 10,000 images, then speed
    python -m benchmarks.zoo_accuracy_speed --images 2000 --models efficientnet-lite1 --json zoo.json
    python -m benchmarks.zoo_accuracy_speed --skip-accuracy  # speed only (run it on a quiet machine)
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from itertools import islice

import torch
from tabulate import tabulate
from tta_bench.tasks import zoo

import tta_bench


def source_pass(task, model, raws):
    with torch.no_grad():
        return task.class_logits(model, task.collate(raws)).softmax(-1)


def accuracy(task, model, n_images: int, batch: int, d: float) -> dict:
    correct = uncertain = seen = 0
    t0 = time.perf_counter()
    samples = islice(task.samples(), n_images)
    while chunk := list(islice(samples, batch)):
        probs = source_pass(task, model, [s.raw for s in chunk])
        top = probs.topk(2, dim=-1)
        labels = torch.tensor([s.label for s in chunk])
        correct += int((top.indices[:, 0] == labels).sum())
        uncertain += int(((top.values[:, 0] - top.values[:, 1]) < d).sum())
        seen += len(chunk)
    wall = time.perf_counter() - t0
    return {"images": seen, "acc_source": 100 * correct / seen, f"frac_uncertain_d{d}": uncertain / seen,
            "accuracy_wall_s": round(wall, 1), "accuracy_pass_samples_per_s": round(seen / wall, 2)}


def speed(task, model, batch: int, n_images: int, warmup: int = 1) -> float:
    raws = [s.raw for s in islice(task.samples(), max(batch, n_images))]
    batches = [raws[i:i + batch] for i in range(0, n_images, batch)]
    for b in batches[:warmup]:
        source_pass(task, model, b)
    t0 = time.perf_counter()
    for b in batches:
        source_pass(task, model, b)
    return sum(map(len, batches)) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(zoo.ZOO), choices=list(zoo.ZOO))
    parser.add_argument("--images", type=int, default=10000, help="images for accuracy (default 10000: all)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the accuracy pass (default 8: on CPU "
                        "per-sample speed peaks at small batches)")
    parser.add_argument("--threshold", type=float, default=0.16, help="d of the uncertain fraction")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed-images", type=int, default=64, help="images timed at batch 1 (and 3x at 64)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        task = tta_bench.get_task("cifar10", model=name, subset="all")
        task.check()
        model = task.load_model().eval()
        row = {"model": name, "resolution": task.resolution, "weights": zoo.ZOO[name].weights,
               "imagenet_top1_reported": zoo.ZOO[name].top1}
        if not args.skip_accuracy:
            row |= accuracy(task, model, args.images, args.batch, args.threshold)
        if not args.skip_speed:
            row["samples_per_s_batch1"] = round(speed(task, model, 1, args.speed_images, warmup=3), 2)
            row["samples_per_s_batch64"] = round(speed(task, model, 64, 3 * 64), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
