"""Engine vs the naive reference loop vs the compute floor, on the same samples, in one process
(DESIGN §6).

Naive loop: every sample forwarded one at a time; per uncertain sample and per learning rate a
deepcopy of the model, a fresh SGD optimizer, forward, backward, clip, step, forward.
Compute floor: one batched source forward over all samples, plus per uncertain sample one
forward+backward of the loss and one forward per learning rate (no copies, no updates, no
bookkeeping). Prints samples/s, the ratios, engine/floor (scan time without model loading),
peak memory, and whether every prediction agrees exactly.

    python benchmarks/naive_vs_engine.py --limit 2000 --lr-grid paper --threads 1
    python benchmarks/naive_vs_engine.py --task text --lr-grid llm --limit 40
"""
from __future__ import annotations

import argparse
import copy
import resource
import time
from itertools import islice

import torch
from tabulate import tabulate

import tta_bench
from tta_bench import Protocol, RunOptions
from tta_bench.cli import LR_GRIDS
from tta_bench.runner import cuda_precision, resolve_device
from tta_bench.task import to_device


def naive(task, model, method, lrs, threshold, clip, limit, device):
    preds, gates = {}, {}
    start = time.perf_counter()
    for sample in islice(task.samples(), limit):
        x = to_device(task.collate([sample.raw]), device)
        with torch.no_grad():
            p = torch.softmax(task.class_logits(model, x)[0], -1)
        top = p.topk(2)
        pred0 = int(top.indices[0])
        uncertain = float(top.values[0] - top.values[1]) < threshold
        gates[sample.index] = uncertain
        for lr in lrs:
            if not uncertain:
                preds[sample.index, lr] = pred0
                continue
            clone = copy.deepcopy(model)
            opt = torch.optim.SGD(clone.parameters(), lr=lr, momentum=0, weight_decay=0)
            opt.zero_grad()
            loss = method.loss(tta_bench.Step(clone, x, task.class_logits))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clone.parameters(), clip)
            opt.step()
            with torch.no_grad():
                preds[sample.index, lr] = int(task.class_logits(clone, x)[0].argmax())
    return preds, gates, time.perf_counter() - start


def floor(task, model, method, lrs, uncertain, limit, batch_size, device) -> float:
    """Seconds of the unavoidable compute (see the module docstring)."""
    samples = list(islice(task.samples(), limit))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            task.class_logits(model, to_device(task.collate([s.raw for s in samples[i:i + batch_size]]), device))
    for sample in samples:
        if sample.index not in uncertain:
            continue
        x = to_device(task.collate([sample.raw]), device)
        method.loss(tta_bench.Step(model, x, task.class_logits)).backward()
        with torch.no_grad():
            for _ in lrs:
                task.class_logits(model, x)
    sync()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="cifar10")
    ap.add_argument("--method", default="ifo")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2.05e-2)
    ap.add_argument("--lr-grid", choices=sorted(LR_GRIDS))
    ap.add_argument("--skip-naive", action="store_true", help="only the engine and the compute floor")
    ap.add_argument("--adapt-block", type=int, help="engine: samples adapted at once (default: per device)")
    ap.add_argument("--threshold", type=float, default=0.16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrs = LR_GRIDS[args.lr_grid] if args.lr_grid else (args.lr,)
    task, method = tta_bench.get_task(args.task), tta_bench.get_method(args.method)

    t0 = time.perf_counter()
    result = tta_bench.run(task, method, Protocol(lrs=lrs, threshold=args.threshold),
                           RunOptions(limit=args.limit, progress=False, device=args.device, track=False,
                                      adapt_block=args.adapt_block))
    engine_s = time.perf_counter() - t0  # includes model loading, like the naive side below
    engine_scan = result.summary[0]["wall_seconds"]  # without model loading
    device = resolve_device(args.device)
    engine_mem = peak_memory_mib(device)
    model = task.load_model().to(device).eval()
    with cuda_precision(False):  # the engine's default numerics
        naive_preds, naive_gates, naive_s = ({}, {}, float("nan")) if args.skip_naive else naive(
            task, model, method, lrs, args.threshold, 1.0, args.limit, device)
    uncertain = set(result.rows.loc[result.rows["uncertain"], "index"])
    with cuda_precision(False):
        floor_s = floor(task, model, method, lrs, uncertain, args.limit, result.config["options"]["batch_size"], device)
    engine_preds = {(r.index, r.lr): r.pred for r in result.rows.itertuples()}

    agree = engine_preds == naive_preds
    n_unc = result.summary[0]["n_uncertain"]
    print(f"{task.name} · {method!r} · {len(lrs)} lr · {args.limit} samples · {n_unc} uncertain · "
          f"{result.metadata['device_name']} · threads {torch.get_num_threads()} · torch {torch.__version__}")
    print(tabulate([["naive loop", naive_s, args.limit / naive_s, 1.0, naive_s / floor_s],
                    ["engine", engine_scan, args.limit / engine_scan, naive_s / engine_scan, engine_scan / floor_s],
                    ["compute floor", floor_s, args.limit / floor_s, naive_s / floor_s, 1.0]],
                   headers=["(model loaded, scan only)", "seconds", "samples/s", "× faster than naive", "× floor"],
                   floatfmt=".2f"))
    print(f"engine with model loading: {engine_s:.2f} s")
    print(f"adaptation: {result.config['adaptation']}; peak memory after the engine run: {engine_mem:.0f} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    if args.skip_naive:
        print("naive loop skipped: no agreement check")
        return
    mismatches = [k for k, v in naive_preds.items() if engine_preds.get(k) != v]
    gates = dict(zip(result.rows["index"], result.rows["uncertain"]))
    gate_flips = {i for i, g in naive_gates.items() if gates.get(i) != g}
    print(f"predictions identical: {agree} ({len(mismatches)} of {len(naive_preds)} differ; "
          f"{len(gate_flips)} samples gated differently by the batched source forward, "
          f"{sum(i not in gate_flips for i, _ in mismatches)} differences among samples gated alike)")


if __name__ == "__main__":
    main()
