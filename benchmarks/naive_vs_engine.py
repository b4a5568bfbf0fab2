"""Engine vs the naive reference loop vs the compute floor, on the same samples, in one process
(DESIGN §6).

Naive loop: every sample forwarded one at a time; per uncertain sample and per learning rate a
deepcopy of the model, a fresh SGD optimizer, forward, backward, clip, step, forward.
Compute floor: one batched source forward over all samples, plus per uncertain sample one
forward+backward of the loss and one forward per learning rate (no copies, no updates, no
bookkeeping). Prints samples/s, the ratios, engine/floor (scan time without model loading),
peak memory, and whether every prediction agrees exactly.

    python -m benchmarks.naive_vs_engine --limit 2000 --lr-grid paper --threads 1
    python -m benchmarks.naive_vs_engine --task text --lr-grid llm --limit 40
    python -m benchmarks.naive_vs_engine --device cuda --lr-grid paper --limit 1000 --slow-limit 200 \
        --adapt-block default,1,16,64      # benchmarks/gpu.py runs the whole GPU matrix
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
from tta_bench.core.task import to_device
from tta_bench.running.scan import autocast as autocast_context
from tta_bench.running.scan import cuda_precision, resolve_device


def naive(task, model, method, lrs, threshold, clip, limit, device):
    preds, gates = {}, {}
    start = time.perf_counter()
    for sample in islice(task.samples(), limit):
        x = to_device(task.collate([sample.raw]), device)
        with torch.no_grad():
            p = torch.softmax(task.class_logits(model, x)[0], -1)
        top = p.topk(2)
        pred0 = int(top.indices[0])
        uncertain = threshold is None or float(top.values[0] - top.values[1]) < threshold
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


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def engine_run(task, method, lrs, threshold, limit, device_name, adapt_block, autocast) -> dict:
    """One timed engine run; adapt_block None: the runner's default for the device."""
    device = resolve_device(device_name)
    reset_peak(device)
    result = tta_bench.run(task, method, Protocol(lrs=lrs, threshold=threshold),
                           RunOptions(limit=limit, progress=False, device=device_name, track=False,
                                      adapt_block=adapt_block, autocast=autocast))
    wall = result.summary[0]["wall_seconds"]  # the scan, without model loading
    return {"adapt_block": adapt_block or "default", "samples": limit, "uncertain": result.summary[0]["n_uncertain"],
            "seconds": wall, "samples_per_s": limit / wall, "peak_mib": peak_memory_mib(device),
            "adaptation": result.config["adaptation"], "block_memory": result.config.get("block_memory"),
            "batch_size": result.config["options"]["batch_size"], "adapted_parameters": result.config["adapted_parameters"], "device_name": result.metadata["device_name"],
            "preds": {(r.index, r.lr): r.pred for r in result.rows.itertuples()},
            "gates": dict(zip(result.rows["index"], result.rows["uncertain"]))}


def measure(task, method, lrs, *, threshold=0.16, limit=200, slow_limit=None, naive_limit=None,
            blocks=(None,), device_name="auto", autocast=None, skip_naive=False, warmup=0) -> dict:
    """Engine runs (one per entry of `blocks`) on `limit` samples; the naive loop on the first
    `naive_limit` and the compute floor on the first `slow_limit` samples (default: `limit`);
    samples/s of each on its own count, predictions compared on the naive loop's samples."""
    slow_limit = slow_limit or limit
    naive_limit = naive_limit or slow_limit
    device = resolve_device(device_name)
    if warmup:  # CUDA context, cuDNN handles and kernels chosen before anything is timed
        for b in dict.fromkeys(blocks):
            engine_run(task, method, lrs, threshold, warmup, device_name, b, autocast)
    engines = [engine_run(task, method, lrs, threshold, slow_limit if b == 1 else limit, device_name, b, autocast)
               for b in blocks]
    model = task.load_model().to(device).eval()
    naive_preds, naive_gates, naive_s = {}, {}, float("nan")
    with cuda_precision(False), autocast_context(autocast, device):  # the engine's numerics
        if not skip_naive:
            reset_peak(device)
            naive_preds, naive_gates, naive_s = naive(task, model, method, lrs, threshold, 1.0, naive_limit, device)
            naive_peak = peak_memory_mib(device)
        uncertain = {i for i, g in engines[0]["gates"].items() if g}
        floor_s = floor(task, model, method, lrs, uncertain, slow_limit, engines[0]["batch_size"], device)
    out = {"task": task.name, "model": task.metadata().get("weights") or task.metadata().get("model"),
           "method": method.name, "lrs": len(lrs), "threshold": threshold, "autocast": autocast,
           "device_name": engines[0]["device_name"], "torch": torch.__version__, "cuda": torch.version.cuda,
           "adapted_parameters": engines[0].pop("adapted_parameters"),
           "floor": {"samples": slow_limit, "seconds": floor_s, "samples_per_s": slow_limit / floor_s},
           "naive": None if skip_naive else {"samples": naive_limit, "seconds": naive_s,
                                             "samples_per_s": naive_limit / naive_s, "peak_mib": naive_peak},
           "engines": []}
    for e in engines:
        e.pop("adapted_parameters", None)
        preds, gates = e.pop("preds"), e.pop("gates")
        e["engine_over_floor"] = out["floor"]["samples_per_s"] / e["samples_per_s"]
        if not skip_naive:
            e["vs_naive"] = e["samples_per_s"] / out["naive"]["samples_per_s"]
            common = [k for k in naive_preds if k in preds]
            e["agree"] = sum(preds[k] == naive_preds[k] for k in common)
            e["compared"] = len(common)
            e["gate_flips"] = sum(gates.get(i) != g for i, g in naive_gates.items() if i in gates)
        out["engines"].append(e)
    return out


def print_report(r: dict) -> None:
    print(f"{r['task']} · {r['model']} · {r['method']} · {r['lrs']} lr · {r['device_name']} · torch {r['torch']}"
          f"{' · autocast ' + r['autocast'] if r['autocast'] else ''}")
    rows = []
    if r["naive"]:
        n = r["naive"]
        rows.append(["naive loop", n["samples"], "", n["samples_per_s"], 1.0, r["floor"]["samples_per_s"] / n["samples_per_s"],
                     "", n["peak_mib"], ""])
    for e in r["engines"]:
        rows.append([f"engine, block {e['adapt_block']}", e["samples"], e["uncertain"], e["samples_per_s"],
                     e.get("vs_naive", float("nan")), e["engine_over_floor"],
                     f"{e['agree']} of {e['compared']}" if "agree" in e else "–", e["peak_mib"], e["adaptation"]])
    f = r["floor"]
    rows.append(["compute floor", f["samples"], "", f["samples_per_s"], "", 1.0, "", "", ""])
    print(tabulate(rows, headers=["", "samples", "uncertain", "samples/s", "× naive", "× floor", "identical preds",
                                  "peak MiB", "adaptation"], floatfmt=".2f"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="cifar10")
    ap.add_argument("--method", default="ifo")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--slow-limit", type=int, help="samples for the naive loop and the floor (default: --limit)")
    ap.add_argument("--naive-limit", type=int, help="samples for the naive loop (default: --slow-limit)")
    ap.add_argument("--lr", type=float, default=2.05e-2)
    ap.add_argument("--lr-grid", choices=sorted(LR_GRIDS))
    ap.add_argument("--skip-naive", action="store_true", help="only the engine and the compute floor")
    ap.add_argument("--adapt-block", default="default",
                    help="engine block sizes, comma-separated (default: the device's default; 1: one at a time)")
    ap.add_argument("--autocast", choices=("bf16",))
    ap.add_argument("--threshold", type=float, default=0.16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lrs = LR_GRIDS[args.lr_grid] if args.lr_grid else (args.lr,)
    task, method = tta_bench.get_task(args.task), tta_bench.get_method(args.method)
    blocks = tuple(None if b == "default" else int(b) for b in args.adapt_block.split(","))
    print_report(measure(task, method, lrs, threshold=args.threshold, limit=args.limit, slow_limit=args.slow_limit,
                         naive_limit=args.naive_limit, blocks=blocks, device_name=args.device,
                         autocast=args.autocast, skip_naive=args.skip_naive))


if __name__ == "__main__":
    main()
